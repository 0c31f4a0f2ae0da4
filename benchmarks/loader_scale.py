"""What the training loader costs as the corpus grows to thousands of shards: open handles, memory, rows decoded
per row used, and time per row, in the stream's own shuffled order.

    .venv/bin/python benchmarks/loader_scale.py [--shards 250 1000 2000] [--rows 2000] [--seq-len 512]

For each shard count S: S uint16 shards of one record batch each (a batch of 1 MiB of tokens, as the writer
makes them), then --rows samples of the real training order (MixedStream over the one source: a keyed
permutation), read with the default bound on open readers (data.max_open_shards = 64) and, side by side in the
same run, with no bound (what the loader did before the bound). It prints the peak of open shard files, the
peak of decoded batches the readers hold, rows decoded per row used (read amplification) and microseconds per row.
Then, on the largest folder, the time a training step waits for its micro-batches with the prefetch thread
(data.prefetch = true, the default) and without, each micro-batch computing for --compute-ms.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from _bench import emit  # noqa: E402

from sharding.shards import BATCH_BYTES, Manifest, ShardWriter  # noqa: E402
from training.config import DataConfig  # noqa: E402
from training.data import MixedStream, OpenedSource  # noqa: E402

VOCAB = 49152


def write_folder(folder: Path, shards: int, seq_len: int) -> int:
    """`shards` one-batch shards; returns the rows per shard."""
    folder.mkdir(parents=True)
    rows = BATCH_BYTES // (seq_len * 2)
    rng = np.random.default_rng(0)
    block = (np.minimum(rng.zipf(1.2, (rows, seq_len)), VOCAB) - 1).astype(np.uint16)
    infos = []
    for i in range(shards):
        writer = ShardWriter(folder / f"train-{i:05d}.arrow", seq_len, np.dtype(np.uint16), "train")
        writer.write(np.roll(block, i, axis=0))
        infos.append(writer.close())
    Manifest(seq_len=seq_len, dtype="uint16", tokenizer_sha256="t" * 64, tokenizer_path="tok", eos_id=0,
             config_sha256="c", shards=tuple(infos)).save(folder)
    return rows


def open_files(folder: Path) -> int:
    return sum(1 for fd in Path("/proc/self/fd").iterdir() if str(folder) in str(fd.resolve(strict=False)))


def read(folder: Path, max_open: int, samples: int, rows_per_shard: int) -> dict[str, float]:
    source = OpenedSource(folder, max_open=max_open)
    stream = MixedStream([source])
    peak_files, peak_held = 0, 0
    began = time.perf_counter()
    for k in range(samples):
        _, row = stream.sample_id(k)
        source.get(row)
        if k % 50 == 0:
            peak_files = max(peak_files, open_files(folder))
            peak_held = max(peak_held, sum(s.rows.nbytes for s in source._open.values()))
    seconds = time.perf_counter() - began
    result = {"peak_files": max(peak_files, open_files(folder)), "us_per_row": seconds / samples * 1e6,
              "amplification": source.batches_decoded * rows_per_shard / samples,
              "held_mb": peak_held / 1e6,
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
    parser.add_argument("--rows", type=int, default=2000, help="samples read per shard count and way")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per row")
    parser.add_argument("--compute-ms", type=float, default=100.0,
                        help="compute per micro-batch in the prefetch comparison (default 100 ms)")
    args = parser.parse_args()
    bound = DataConfig.max_open_shards
    rows = []
    print(f"{'shards':>7} {'way':>9} {'open files':>10} {'held MB':>8} {'rows decoded/used':>18} {'us/row':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for shards in args.shards:
            folder = Path(tmp) / f"s{shards}"
            per_shard = write_folder(folder, shards, args.seq_len)
            for way, max_open in (("bounded", bound), ("unbounded", 1 << 30)):
                r = read(folder, max_open, args.rows, per_shard)
                print(f"{shards:>7} {way:>9} {r['peak_files']:>10} {r['held_mb']:>8.0f} "
                      f"{r['amplification']:>18.1f} {r['us_per_row']:>8.0f}", flush=True)
                if way == "bounded":
                    rows.append((f"loader open shard files at {shards} shards (bound {bound})",
                                 str(r["peak_files"]), f"<= {bound}", r["peak_files"] <= bound))
                    rows.append((f"loader rows decoded per row used at {shards} shards", f"{r['amplification']:.1f}",
                                 "", True))
                else:
                    rows.append((f"unbounded loader open shard files at {shards} shards", str(r["peak_files"]),
                                 "", True))
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
