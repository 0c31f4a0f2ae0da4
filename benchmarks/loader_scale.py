"""What the training loader costs as the corpus grows to thousands of shards: open handles, rows decoded per row
used, bytes read from storage per row, and time per row, cold and warm, in the stream's own shuffled order.

    .venv/bin/python benchmarks/loader_scale.py [--shards 250 1000 2000] [--rows 2000] [--compare-shards 256]
        [--compare-rows 200]

Rows are 2,048 uint16 tokens (4 KiB), the users' shortest usual rows; token ids from a Zipf law over 49,152 ids.

1. Random rows, side by side in one run: --compare-shards shards of 1,024 rows (1 GiB of tokens at 256), written
   twice: in the writer's record batches of 16 KiB (format 3: checked batch reads of exactly their bytes), and in
   batches of 1 MiB read through a memory map (what the loader read before: its batches, and its mmap page
   faults). --compare-rows samples (few against the folder, so that few rows share a 1 MiB batch, as in a
   terabyte corpus) of the real training order (MixedStream: a keyed permutation) with the default bound on open
   readers, first with the files dropped from the page cache (posix_fadvise DONTNEED: "cold", what a node reading
   a shared filesystem sees), then the same rows again ("warm"). Bytes read are the kernel's count of bytes this
   process fetched from storage (/proc/self/io read_bytes), which includes read-ahead.
2. Open handles: S shards of 32 rows for each S of --shards, read with the default bound on open readers
   (data.max_open_shards = 64) and, side by side, with no bound: peak open shard files, rows decoded per row used.
3. On the largest folder, the time a training step waits for its micro-batches with the prefetch thread
   (data.prefetch = true, the default) and without, each micro-batch computing for --compute-ms.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from _bench import emit  # noqa: E402

from sharding.shards import Manifest, ShardWriter  # noqa: E402
from training.config import DataConfig  # noqa: E402
from training.data import MixedStream, OpenedSource  # noqa: E402

VOCAB = 49152
SEQ_LEN = 2048
ROW_BYTES = SEQ_LEN * 2


def write_folder(folder: Path, shards: int, rows: int, batch_bytes: int = 16 << 10, old: bool = False) -> None:
    """`shards` shards of `rows` rows; `old`: a manifest without batch tables, so reads go through a memory map."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    block = (np.minimum(rng.zipf(1.2, (rows, SEQ_LEN)), VOCAB) - 1).astype(np.uint16)
    infos = []
    for i in range(shards):
        writer = ShardWriter(folder / f"train-{i:05d}.arrow", SEQ_LEN, np.dtype(np.uint16), "train", batch_bytes)
        writer.write(np.roll(block, i, axis=0))
        infos.append(writer.close())
    Manifest(seq_len=SEQ_LEN, dtype="uint16", tokenizer_sha256="t" * 64, tokenizer_path="tok", eos_id=0,
             config_sha256="c", shards=tuple(infos)).save(folder)
    if old:
        data = json.loads((folder / "manifest.json").read_text())
        for shard in data["shards"]:
            for name in ("table", "table_bytes", "batch_rows", "dtype"):
                shard.pop(name, None)
        data["format_version"] = 1
        (folder / "manifest.json").write_text(json.dumps(data))


def drop_cache(folder: Path) -> None:
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def storage_bytes() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes"))


def open_files(folder: Path) -> int:
    return sum(1 for fd in Path("/proc/self/fd").iterdir() if str(folder) in str(fd.resolve(strict=False)))


def opened(folder: Path, max_open: int = DataConfig.max_open_shards) -> OpenedSource:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the "before" folder is format 1 on purpose
        return OpenedSource(folder, max_open=max_open)


def random_rows(folder: Path, samples: int) -> dict[str, float]:
    """Cold, then warm, over the same `samples` rows of the training order."""
    drop_cache(folder)
    source = opened(folder)
    ids = [MixedStream([source]).sample_id(k)[1] for k in range(samples)]
    result = {}
    for regime in ("cold", "warm"):
        decoded, fetched, began = source.rows_decoded, storage_bytes(), time.perf_counter()
        for i in ids:
            source.get(i)
        result[f"{regime}_us"] = (time.perf_counter() - began) / samples * 1e6
        result[f"{regime}_kib"] = (storage_bytes() - fetched) / samples / 1024
        result["amplification"] = (source.rows_decoded - decoded) / samples
    source.close()
    return result


def handles(folder: Path, max_open: int, samples: int) -> dict[str, float]:
    source = opened(folder, max_open)
    stream = MixedStream([source])
    peak_files = 0
    for k in range(samples):
        source.get(stream.sample_id(k)[1])
        if k % 50 == 0:
            peak_files = max(peak_files, open_files(folder))
    result = {"peak_files": max(peak_files, open_files(folder)), "amplification": source.rows_decoded / samples,
              "readers_opened": source.readers_opened}
    source.close()
    return result


def prefetch_wait(folder: Path, compute_ms: float, steps: int, micro_batch: int, accum: int,
                  enabled: bool) -> tuple[float, float]:
    """(seconds waited for batches, seconds of the whole loop) over `steps` steps whose every micro-batch
    computes for `compute_ms`: a sleep, as the host waits for a GPU's forward and backward (the GIL is free).
    The first step is left out of both: its first batch is read before anything computes, with or without."""
    from training.prefetch import Prefetcher

    stream = MixedStream([OpenedSource(folder)])
    batches = Prefetcher(stream, 0, 1, micro_batch, accum, enabled=enabled)
    waited, began = 0.0, time.perf_counter()
    for step in range(steps + 1):
        if step == 1:
            waited, began = 0.0, time.perf_counter()
        for m in range(accum):
            t0 = time.perf_counter()
            batches.next_batch(m)
            waited += time.perf_counter() - t0
            time.sleep(compute_ms / 1e3)
        stream.advance(micro_batch * accum)
    batches.close()
    return waited, time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, nargs="+", default=[250, 1000, 2000], help="shard counts")
    parser.add_argument("--rows", type=int, default=2000, help="samples read per folder and way")
    parser.add_argument("--compare-shards", type=int, default=256, help="shards of the random-row comparison")
    parser.add_argument("--compare-rows", type=int, default=200, help="samples read in the random-row comparison")
    parser.add_argument("--compute-ms", type=float, default=100.0,
                        help="compute per micro-batch in the prefetch comparison (default 100 ms)")
    args = parser.parse_args()
    bound, rows = DataConfig.max_open_shards, []
    with tempfile.TemporaryDirectory() as tmp:
        print(f"random rows of {ROW_BYTES // 1024} KiB, {args.compare_shards} shards of 1,024 rows, "
              f"{args.compare_rows} rows of the training order, cold then warm:")
        print(f"{'way':>28} {'rows decoded/used':>18} {'cold KiB read/row':>18} {'cold us/row':>12} "
              f"{'warm us/row':>12}")
        for way, batch_bytes, old in (("16 KiB batches, checked", 16 << 10, False),
                                      ("1 MiB batches, mmap (before)", 1 << 20, True)):
            folder = Path(tmp) / f"compare-{batch_bytes}"
            write_folder(folder, args.compare_shards, 1024, batch_bytes, old)
            r = random_rows(folder, args.compare_rows)
            shutil.rmtree(folder)
            print(f"{way:>28} {r['amplification']:>18.2f} {r['cold_kib']:>18.1f} {r['cold_us']:>12.0f} "
                  f"{r['warm_us']:>12.0f}", flush=True)
            new = not old
            rows += [(f"loader random rows: rows decoded per row used, {way}", f"{r['amplification']:.2f}",
                      "<= 4" if new else "", r["amplification"] <= 4 if new else None),
                     (f"loader random rows: KiB read from storage per {ROW_BYTES // 1024} KiB row (cold), {way}",
                      f"{r['cold_kib']:.1f}", "", None),
                     (f"loader random rows: us per row cold / warm, {way}", f"{r['cold_us']:.0f} / {r['warm_us']:.0f}",
                      "", None)]
        print(f"\n{'shards':>7} {'way':>9} {'open files':>10} {'rows decoded/used':>18} {'readers opened':>15}")
        for shards in args.shards:
            folder = Path(tmp) / f"s{shards}"
            write_folder(folder, shards, 32)
            for way, max_open in (("bounded", bound), ("unbounded", 1 << 30)):
                r = handles(folder, max_open, args.rows)
                print(f"{shards:>7} {way:>9} {r['peak_files']:>10} {r['amplification']:>18.2f} "
                      f"{r['readers_opened']:>15}", flush=True)
                if way == "bounded":
                    rows += [(f"loader open shard files at {shards} shards (bound {bound})", str(r["peak_files"]),
                              f"<= {bound}", r["peak_files"] <= bound),
                             (f"loader rows decoded per row used at {shards} shards", f"{r['amplification']:.2f}",
                              "<= 4", r["amplification"] <= 4)]
                else:
                    rows.append((f"unbounded loader open shard files at {shards} shards", str(r["peak_files"]),
                                 "", None))
            if shards != max(args.shards):
                shutil.rmtree(folder)
        folder = Path(tmp) / f"s{max(args.shards)}"
        print(f"\nloader wait per step at {max(args.shards)} shards, micro-batch 8 x accumulation 2, "
              f"{args.compute_ms:g} ms of compute per micro-batch:")
        for way, enabled in (("prefetch", True), ("no prefetch", False)):
            waited, total = prefetch_wait(folder, args.compute_ms, 40, 8, 2, enabled)
            print(f"{way:>12}: waited {waited / 40 * 1e3:7.1f} ms per step = {waited / total:.2%} of the step",
                  flush=True)
            rows.append((f"loader wait / step time, {way}", f"{waited / total:.2%}",
                         "<= 1%" if enabled else "", waited / total <= 0.01 if enabled else True))
    emit(rows)


if __name__ == "__main__":
    main()
