"""How evenly the map array's elements share the input bytes: files assigned by size (largest first, each to the
element with the fewest bytes so far: what `sharding.stage.assign_by_size` does) against by index (file i to
element i % N, what the map did before), and by size once files larger than shard.split_mb are split into pieces
(`sharding.units`, the default 1,024 MB). A map element's time is about proportional to its bytes, so the array
takes as long as its fullest element: max / mean bytes per element is the time lost to imbalance.

    .venv/bin/python benchmarks/map_balance.py [--files 2000 8000] [--tasks 64 256] [--sigma 1.0 2.0]
        [--split-mb 1024]

File sizes are drawn from a log-normal law (sigma 1: sizes within ~7x of each other for most files, as crawl
dumps cut by count; sigma 2: a long tail, as per-source files of mixed sites); a fixed seed, so a rerun prints the
same figures. Also the case no assignment can fix: one file as large as all the others together.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from _bench import emit  # noqa: E402

from sharding.stage import assign_by_size  # noqa: E402
from sharding.units import plan_units  # noqa: E402


def imbalance(sizes: list[int], shares: list[list[int]]) -> float:
    loads = [sum(sizes[i] for i in share) for share in shares]
    return max(loads) / (sum(sizes) / len(shares))


def split_imbalance(sizes: list[int], tasks: int, split_mb: float) -> tuple[float, int]:
    """(fullest element / mean, units) with the files split into units as the map does."""
    units = [u.size for u in plan_units([{"path": f"{i}.jsonl", "size": s} for i, s in enumerate(sizes)], split_mb)]
    return imbalance(units, assign_by_size(units, tasks)), len(units)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, nargs="+", default=[2000, 8000])
    parser.add_argument("--tasks", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--sigma", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--split-mb", type=float, default=1024.0)
    args = parser.parse_args()
    rows = []
    print(f"{'files':>6} {'tasks':>6} {'sigma':>6} {'by index max/mean':>18} {'by size max/mean':>17} "
          f"{'split, max/mean':>16} {'units':>6}")
    for files in args.files:
        for tasks in args.tasks:
            for sigma in args.sigma:
                sizes = [int(s) for s in np.random.default_rng(0).lognormal(17, sigma, files)]  # median ~24 MB
                by_index = imbalance(sizes, [list(range(r, files, tasks)) for r in range(tasks)])
                by_size = imbalance(sizes, assign_by_size(sizes, tasks))
                split, units = split_imbalance(sizes, tasks, args.split_mb)
                print(f"{files:>6} {tasks:>6} {sigma:>6.1f} {by_index:>18.3f} {by_size:>17.3f} {split:>16.3f} "
                      f"{units:>6}", flush=True)
                rows += [(f"map bytes, fullest element / mean, {files} files, {tasks} tasks, sigma {sigma:g}: "
                          f"split at {args.split_mb:g} MB (whole files by size; by index)",
                          f"{split:.3f} ({by_size:.3f}; {by_index:.3f})", "", None)]
    sizes = [100_000_000] * 999 + [99_900_000_000]  # 999 files of 100 MB and one of 99.9 GB
    whole = imbalance(sizes, assign_by_size(sizes, 64))
    split, units = split_imbalance(sizes, 64, args.split_mb)
    print(f"\none file of half the bytes among 1,000, 64 tasks: fullest element / mean {whole:.1f} with whole files "
          f"(that element takes 32x the mean), {split:.3f} split at {args.split_mb:g} MB ({units} units)")
    emit([*rows, (f"map bytes, fullest element / mean, one file of half the bytes, 64 tasks: split at "
                  f"{args.split_mb:g} MB (whole files)", f"{split:.3f} ({whole:.1f})", "", None)])


if __name__ == "__main__":
    main()
