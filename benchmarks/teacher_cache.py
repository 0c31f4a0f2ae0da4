"""What the teacher top-k cache costs against what a distillation reads of it, side by side in one run: the cache
of every train row (a cache made without a plan) and the cache planned for the distillation (the rows of its
first steps x global batch samples).

    .venv/bin/python benchmarks/teacher_cache.py [--steps 30] [--batch 2] [--k 32]

The licenses corpus (300 documents, seq_len 256) and a 4-layer teacher (hidden 256), one compute task. Printed
for each: rows cached, cache bytes (both splits), compute + index seconds, and cache bytes / bytes the
distillation reads (its steps x batch samples, each one cache row). The demo's distillation reads 30 steps x 2
samples, the defaults here. Goal: planned cache bytes / bytes read <= 1.1.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from _bench import emit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="distillation steps (default 30, the demo's)")
    parser.add_argument("--batch", type=int, default=2, help="global batch in samples (default 2, the demo's)")
    parser.add_argument("--k", type=int, default=32, help="logits kept per position (default 32, the demo's)")
    args = parser.parse_args()
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    from train_overhead import prepare

    from sharding.shards import Manifest
    from training.config import TeacherLogitsConfig
    from training.data import OpenedSource
    from training.teacher_logits import compute, index

    samples = args.steps * args.batch
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work, 256, 4, args.steps, docs=300)
        teacher, shards = work / "model", work / "shards"
        rows = OpenedSource(shards).rows
        for name, plan in (("every train row", None), ("planned", (samples, 1234))):
            cache = work / name.replace(" ", "-")
            cache.mkdir()
            cfg = TeacherLogitsConfig(k=args.k, tasks=1)
            began = time.perf_counter()
            compute(cfg, teacher, shards, cache, 0, plan)
            index(cfg, teacher, shards, cache, plan)
            seconds = time.perf_counter() - began
            manifest = Manifest.load(cache)
            cached_rows = sum(s.rows for s in manifest.split_shards("topk_values"))
            size = sum(s.bytes for s in manifest.shards)
            read = size / cached_rows * samples  # each sample read is one cache row of each split
            results[name] = (cached_rows, size, seconds, size / read)
            print(f"{name:16s}: {cached_rows:5d} of {rows} rows cached, {size / 1e6:7.2f} MB, {seconds:6.1f} s, "
                  f"cache bytes / bytes read {size / read:.2f}", flush=True)
    full, planned = results["every train row"], results["planned"]
    print(f"\ndistillation reads {samples} samples ({args.steps} steps x {args.batch}); the planned cache takes "
          f"{planned[2] / full[2]:.2f} of the time and {planned[1] / full[1]:.2f} of the bytes of the full one")
    emit([("planned cache bytes / bytes distillation reads", f"{planned[3]:.2f}", "<= 1.1", planned[3] <= 1.1),
          ("full cache bytes / bytes distillation reads", f"{full[3]:.2f}", "", None),
          ("planned / full cache compute time", f"{planned[2] / full[2]:.2f}", "", None)])


if __name__ == "__main__":
    main()
