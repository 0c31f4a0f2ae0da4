"""Cost of a distillation step, side by side in one run: live teacher / cached top-k / CE only.

    .venv/bin/python benchmarks/distill_cost.py [--steps 30] [--k 64]

A 2-layer student (hidden 256) learns from a 4-layer teacher (same width) on the licenses corpus,
2 processes, ZeRO-2, micro-batch 4 x accumulation 2 x 256 tokens. The three runs use the same
student, data and engine; they differ only in the objective: the teacher's forward pass in every
step, the teacher's top-k logits read from the teacher-logits stage's cache (made once, timed
separately), or plain cross-entropy. Rates are each run's own tokens/s from its metrics.
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
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--k", type=int, default=64)
    args = parser.parse_args()
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    from train_overhead import prepare, stillroom_run

    from training.config import TeacherLogitsConfig
    from training.student import student_from_teacher
    from training.teacher_logits import compute, index

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # 300 documents: the cache covers every training row, and the teacher runs on this CPU.
        config = prepare(work, 256, 4, args.steps, docs=300)  # its model is the 4-layer teacher
        teacher, shards = work / "model", work / "shards"
        student = student_from_teacher(teacher, work / "student", layers=2)
        began = time.perf_counter()
        cache = work / "topk"
        cache.mkdir()
        topk = TeacherLogitsConfig(k=args.k, tasks=1)
        compute(topk, teacher, shards, cache, 0)
        index(topk, teacher, shards, cache)
        cache_s = time.perf_counter() - began
        base = config.read_text()
        distill = (base.replace("[cpt", "[distill").replace('stages = ["cpt"]', 'stages = ["distill"]')
                   .replace(f'path = "{teacher}"', f'path = "{student}"'))
        rates: dict[str, float] = {}
        for i, (name, text) in enumerate((
                ("live teacher", distill.replace("[distill]", f'[distill]\nteacher = "{teacher}"')),
                ("cached top-k", distill.replace("[distill]", f'[distill]\nteacher = "{teacher}"\n'
                                                              f'topk_cache = "{cache}"')),
                ("CE only", base.replace(f'path = "{teacher}"', f'path = "{student}"')))):
            run_config = work / f"run{i}.toml"
            run_config.write_text(text.replace('name = "bench"', f'name = "run{i}"'))
            records, _ = stillroom_run(run_config, 29720 + i, stage="cpt" if name == "CE only" else "distill")
            rates[name] = float([r for r in records if r["kind"] == "train"][-1]["tokens_per_s"])  # type: ignore[arg-type]
    ce = rates["CE only"]
    print(f"\nstudent: 2 of the teacher's 4 layers, hidden 256; {args.steps} steps; top-k k={args.k} cache built "
          f"in {cache_s:.1f} s\n\n{'objective':<14} {'tokens/s':>9} {'step time / CE-only':>20}")
    for name, rate in rates.items():
        print(f"{name:<14} {rate:>9.0f} {ce / rate:>20.2f}")
    # The script states no goals for these, so they are reported for information.
    emit([(f"top-k k={args.k} cache build (s)", f"{cache_s:.1f}", "", None)]
         + [(f"{name} tokens/s", f"{rate:.0f}", "", None) for name, rate in rates.items()]
         + [(f"{name} step time / CE only", f"{ce / rate:.2f}", "", None)
            for name, rate in rates.items() if name != "CE only"])


if __name__ == "__main__":
    main()
