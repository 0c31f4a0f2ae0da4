"""What checking every shard batch read costs: decode time per record batch with and without the XXH3 check.

    .venv/bin/python benchmarks/shard_checksum.py [--batches 1024] [--seq-len 2048] [--repeats 5] [--batch-kib 16]

Writes a uint16 shard of --batches record batches (16 KiB of tokens each, the writer's size) into a temp folder,
one copy per way of reading it, token ids drawn from a Zipf law over a 49,152-entry vocabulary (SmolLM2's
size): ~0.6 of the token bytes stored, near the 0.58 of runs/tiny's real shards. Then, side by side in one run, the
ways take turns batch by batch, each batch decoded from the page cache:

  checked   ShardReader with the shard's batch table: XXH3 of the stored bytes, compare, decode those bytes
  bare      the same read and decode of the same bytes (pread + read_message + read_record_batch + to_numpy),
            without the table lookup and the hash
  footer    ShardReader without a table (format 1): the batch found through the file's footer, not checked

and the XXH3 of each batch's stored bytes alone, in two regimes: "cold", the batch's bytes last touched a whole
pass earlier (as in training, which reads each batch once: the hash then streams them from memory, not from
the CPU caches), and "hot", the batch's stored bytes copied just before (in the caches: what the hash costs
when it does not have to fetch them). Medians over batches x repeats. The figures with a
goal are the check's cost, checked / bare - 1: <= 15% of a 16 KiB batch's read and decode (other --batch-kib:
reported only). The check costs a nearly fixed ~5-10 us a batch (the XXH3 of ~10 KB from memory, the table
lookup), so its share of a small batch is larger than of the 1 MiB batches of before, whose decode a random row
no longer pays (benchmarks/loader_scale.py); footer shows what format 1's reads cost.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import emit  # noqa: E402

from common.checksum import xxh3_bytes  # noqa: E402
from sharding.batch_table import BatchTable, block_hashes  # noqa: E402
from sharding.shard_reader import ShardReader  # noqa: E402
from sharding.shards import BATCH_BYTES, ShardWriter  # noqa: E402

VOCAB = 49152
WAYS = ["checked", "bare", "footer", "xxh3"]
GOALS = {16: 0.15}  # KiB of tokens a batch -> what the check may add to its read and decode


def write_shard(path: Path, batches: int, seq_len: int, batch_bytes: int) -> np.ndarray:
    """A shard of `batches` full record batches (the same tokens for every path); returns its batch table."""
    writer = ShardWriter(path, seq_len, np.dtype(np.uint16), "train", batch_bytes)
    rng = np.random.default_rng(0)
    for _ in range(batches):
        ids = np.minimum(rng.zipf(1.2, (writer.batch_rows, seq_len)), VOCAB) - 1
        writer.write(ids.astype(np.uint16))
    table = writer.close().batch_table(path.parent)
    assert table is not None and len(table) == batches
    return table.entries()


def timed(call: Callable[[int], object], b: int) -> float:
    start = time.perf_counter()
    call(b)
    return time.perf_counter() - start


def measure(folder: Path, batches: int, seq_len: int, repeats: int, batch_bytes: int) -> dict[str, dict[str, float]]:
    """{regime: {way: median seconds per batch}} for the "cold" and "hot" regimes (see the docstring)."""
    # Each way reads its own copy of the shard: no way finds bytes in the CPU caches because another way has just
    # read them, while the ways take turns batch by batch, so drift in the machine's load hits all of them alike.
    paths = {name: folder / f"{name}.arrow" for name in WAYS}
    written = [write_shard(path, batches, seq_len, batch_bytes) for path in paths.values()]
    assert all(np.array_equal(t, written[0]) for t in written)  # the copies are identical, so one table serves all
    table = written[0]
    # The checked reader reads its table from the table file, one block at a time, as training does.
    checked = ShardReader(paths["checked"], BatchTable.from_file(
        folder / "checked.batches", table.nbytes, block_hashes(table)), batches * (batch_bytes // (seq_len * 2)))
    footer = ShardReader(paths["footer"])
    slices = {name: [pa.memory_map(str(path)).read_buffer().slice(int(e["offset"]), int(e["length"]))
                     for e in table] for name, path in paths.items()}

    bare_fd, entries = os.open(paths["bare"], os.O_RDONLY), table.tolist()

    def bare(b: int) -> None:  # what the checked reader does, without the table lookup and the hash
        offset, length, _ = entries[b]
        stored = pa.py_buffer(os.pread(bare_fd, length, offset))
        batch = pa.ipc.read_record_batch(pa.ipc.read_message(stored), checked.schema)
        batch.column(0).flatten().to_numpy().reshape(-1, checked.seq_len)

    ways: dict[str, Callable[[int], object]] = {
        "checked": checked.batch, "bare": bare, "footer": footer.batch, "xxh3": lambda b: xxh3_bytes(slices["xxh3"][b])}
    for way in ways.values():  # warm-up: page cache, the maps' page tables, the allocator
        for b in range(batches):
            way(b)
    medians = {}
    for regime in ("cold", "hot"):
        times: dict[str, list[float]] = {name: [] for name in WAYS}
        for turn in range(repeats * batches):
            b, first = turn % batches, turn % len(WAYS)
            for name in WAYS[first:] + WAYS[:first]:
                if regime == "hot":
                    bytes(slices[name][b])  # a copy of the way's stored bytes just before: they are in the caches
                times[name].append(timed(ways[name], b))
        medians[regime] = {name: statistics.median(values) for name, values in times.items()}
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=1024, help="record batches in the shard")
    parser.add_argument("--batch-kib", type=int, default=BATCH_BYTES >> 10,
                        help="KiB of tokens per record batch (default: the writer's)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5, help="passes over every batch, per regime")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        medians = measure(Path(tmp), args.batches, args.seq_len, args.repeats, args.batch_kib << 10)
        stored = os.path.getsize(Path(tmp) / "checked.arrow") / args.batches / 1e6
    print(f"{args.batches} batches of {args.batch_kib} KiB of uint16 tokens, {stored:.4f} MB stored each; medians of "
          f"{args.batches * args.repeats} decodes per way and regime")
    print(f"{'regime':6s} {'checked ms':>10s} {'bare ms':>8s} {'footer ms':>9s} {'xxh3 us':>8s} {'xxh3 GB/s':>9s} "
          f"{'checked/bare':>12s} {'checked/footer':>14s}")
    rows, goal = [], GOALS.get(args.batch_kib)
    for regime, m in medians.items():
        overhead = m["checked"] / m["bare"] - 1
        print(f"{regime:6s} {m['checked'] * 1e3:10.4f} {m['bare'] * 1e3:8.4f} {m['footer'] * 1e3:9.4f} "
              f"{m['xxh3'] * 1e6:8.1f} {stored / m['xxh3'] / 1e3:9.1f} {overhead:+12.2%} "
              f"{m['checked'] / m['footer'] - 1:+14.2%}")
        rows += [(f"shard checksum ({regime} bytes): decode time per batch, checked / bare", f"{overhead:+.2%}",
                  f"<= +{goal:.0%}" if goal else "", overhead <= goal if goal else None),
                 (f"shard checksum ({regime} bytes): XXH3 of a batch's stored bytes / its bare decode",
                  f"{m['xxh3'] / m['bare']:.2%} ({m['xxh3'] * 1e6:.0f} us of {m['bare'] * 1e3:.2f} ms)", "", None)]
    emit([*rows, (f"shard checksum: stored MB per {args.batch_kib} KiB batch of tokens", f"{stored:.4f}", "", None)])


if __name__ == "__main__":
    main()
