"""What content-checked checkpoints cost as a rank's checkpoint share grows: hashing at save, re-hashing on resume.

    .venv/bin/python benchmarks/checkpoint_integrity.py [--mb 64 256 1024] [--repeats 3]

For each size S (one rank's share of a checkpoint: an fp32 state dict of S MB, saved with torch.save the way
DeepSpeed's checkpoint engine does), measured side by side in one run:
  save       torch.save + fsync of the file (what a save cost before content hashes; the fsync was rank 0's);
  hash       `hash_files`: this rank's fsync + XXH3 of what it just wrote (from the page cache);
  verify     XXH3 of the file again, as a rank does on resume (page cache dropped is not possible here: warm);
  load       torch.load of the file, what the resume does next.
It prints the hash cost as a fraction of the save and the verify cost as a fraction of the load, with their
growth from the smallest size: both must grow with S (a constant fraction), not faster.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _bench import emit  # noqa: E402

from common.checksum import xxh3_file  # noqa: E402
from common.publish import fsync_path  # noqa: E402
from training.checkpoint import hash_files  # noqa: E402


def _timed(fn: object) -> float:
    began = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - began


def measure(folder: Path, mb: int, repeats: int) -> dict[str, float]:
    state = {f"layer{i}": torch.randn(mb * (1 << 20) // 4 // 8) for i in range(8)}  # 8 tensors, mb MB in all
    path = folder / f"share-{mb}.pt"
    times: dict[str, list[float]] = {"save": [], "hash": [], "verify": [], "load": []}
    for _ in range(repeats):
        times["save"].append(_timed(lambda: (torch.save(state, path), fsync_path(path))))
        times["hash"].append(_timed(lambda: hash_files(folder, [path])))
        times["verify"].append(_timed(lambda: xxh3_file(path)))
        times["load"].append(_timed(lambda: torch.load(path, weights_only=True)))
    path.unlink()
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, nargs="+", default=[64, 256, 1024], help="share sizes in MB")
    parser.add_argument("--repeats", type=int, default=3, help="runs per size; the median is reported")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        results = {mb: measure(Path(tmp), mb, args.repeats) for mb in args.mb}
    base = results[args.mb[0]]
    print(f"{'MB':>6} {'save s':>8} {'hash s':>8} {'hash/save':>10} {'verify s':>9} {'load s':>8} "
          f"{'verify/load':>12} {'GB/s hash':>10}")
    for mb, r in results.items():
        print(f"{mb:>6} {r['save']:>8.3f} {r['hash']:>8.3f} {r['hash'] / r['save']:>10.3f} {r['verify']:>9.3f} "
              f"{r['load']:>8.3f} {r['verify'] / r['load']:>12.3f} {mb / 1024 / r['verify']:>10.2f}")
    largest = results[args.mb[-1]]
    growth = (largest["hash"] / base["hash"]) / (args.mb[-1] / args.mb[0])
    rows += [
        (f"checkpoint hash / save at {args.mb[-1]} MB per rank", f"{largest['hash'] / largest['save']:.3f}", "", True),
        (f"checkpoint verify / load at {args.mb[-1]} MB per rank", f"{largest['verify'] / largest['load']:.3f}",
         "", True),
        ("checkpoint XXH3 throughput (GB/s, warm)", f"{args.mb[-1] / 1024 / largest['verify']:.2f}", "", True),
        (f"hash time growth per size growth (x{args.mb[-1] // args.mb[0]} size)", f"{growth:.2f}", "<= 1.3",
         growth <= 1.3),
    ]
    emit(rows)


if __name__ == "__main__":
    main()
