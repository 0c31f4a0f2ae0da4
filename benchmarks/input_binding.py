"""What binding a shard stage to its inputs costs as the corpus grows: metadata calls, time and bytes.

    .venv/bin/python benchmarks/input_binding.py [--files 1000 4000 16000] [--world 64]

For each input count N (empty files in a temp folder, one glob) and a map array of `world` elements:
the first element records the list (N stats, inputs.json written), every element checks it (the
expanded paths compared whole, then only its own N/world files stat'ed), and the reduce checks all
N. It prints stat calls per element and in all, seconds per element, and the record's size, with
their growth from the smallest N: metadata calls are what a shared filesystem's metadata server
pays, so they must grow with N, not with N x world.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import emit  # noqa: E402

import sharding.stage as stage  # noqa: E402
from launcher.run_config import load_run_config  # noqa: E402


class _CountingStat:
    """os.stat as sharding.stage calls it, counted (the metadata calls a filesystem server would answer)."""

    def __init__(self) -> None:
        self.calls, self._stat = 0, os.stat

    def __call__(self, path: object, *args: object, **kwargs: object) -> os.stat_result:
        self.calls += 1
        return self._stat(path, *args, **kwargs)  # type: ignore[arg-type]


def measure(n: int, world: int, root: Path) -> dict[str, float]:
    inputs, out = root / f"in-{n}", root / f"out-{n}"
    inputs.mkdir()
    out.mkdir()
    for i in range(n):
        (inputs / f"part-{i:06d}.jsonl").write_bytes(b"")
    cfg = load_run_config(None, [f"shard.inputs={json.dumps([str(inputs / '*.jsonl')])}"]).shard
    counter = _CountingStat()
    stage.os.stat = counter  # type: ignore[assignment]
    try:
        began = time.perf_counter()
        stage.bind_inputs(cfg, out, own=lambda i: i % world == 0)  # element 0 records the list
        first_s, first_calls = time.perf_counter() - began, counter.calls
        counter.calls, began = 0, time.perf_counter()
        for rank in range(1, world):
            stage.bind_inputs(cfg, out, own=lambda i, rank=rank: i % world == rank)
        later_s, later_calls = (time.perf_counter() - began) / (world - 1), counter.calls / (world - 1)
        counter.calls = 0
        stage.bind_inputs(cfg, out)  # the reduce
        reduce_calls = counter.calls
    finally:
        stage.os.stat = counter._stat  # type: ignore[assignment]
    total = first_calls + later_calls * (world - 1) + reduce_calls
    return {"n": n, "first_calls": first_calls, "later_calls": later_calls, "later_s": later_s, "first_s": first_s,
            "reduce_calls": reduce_calls, "total_calls": total, "record_bytes": (out / stage.INPUTS).stat().st_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, nargs="+", default=[1000, 4000, 16000])
    parser.add_argument("--world", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(n, args.world, Path(tmp)) for n in args.files]
    base = rows[0]
    print(f"{'files':>7} {'stats/elem':>10} {'s/elem':>8} {'stats all':>10} {'x(all)':>7} {'record KB':>9}")
    for r in rows:
        print(f"{r['n']:7d} {r['later_calls']:10.1f} {r['later_s']:8.4f} {r['total_calls']:10.0f} "
              f"{r['total_calls'] / base['total_calls']:7.2f} {r['record_bytes'] / 1024:9.1f}")
    big = rows[-1]
    per_element_all = big["n"] * args.world  # what stat'ing every file in every element would cost
    emit([
        (f"input binding: stat calls of one map element at {big['n']} files, world {args.world}",
         f"{big['later_calls']:.0f} (all files: {big['n']})", "", None),
        (f"input binding: stat calls in all at {big['n']} files x {args.world} elements",
         f"{big['total_calls']:.0f} vs {per_element_all} if every element stat'ed every file", "", None),
        (f"input binding: growth of all stat calls, x{big['n'] // base['n']} files",
         f"x{big['total_calls'] / base['total_calls']:.2f}", f"<= x{big['n'] // base['n']}",
         big["total_calls"] / base["total_calls"] <= big["n"] / base["n"] * 1.01),
        (f"input binding: inputs.json at {big['n']} files", f"{big['record_bytes'] / 1024:.0f} KB", "", None),
    ])


if __name__ == "__main__":
    main()
