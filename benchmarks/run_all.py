"""Runs every benchmark in benchmarks/ one after another and ends with one table of all their figures.

    .venv/bin/python benchmarks/run_all.py [--quick] [--only NAME ...] [--args NAME="ARGS" ...]

Each benchmark script runs with this Python, its output streamed as it comes; the figures are the
BENCH lines it prints at its end (see benchmarks/_bench.py), gathered into a table of figure,
measured value, goal and verdict. A figure short of its goal is reported, not an error: the exit
status is non-zero only when a script fails (exits non-zero or reports no figure).

Scripts whose names start with "_", and the helpers in HELPERS (libraries the benchmarks import),
are not run by themselves. Arguments for one script: --args train_overhead="--steps 20" (shell
words, repeatable); they come after --quick's small sizes for that script, so they override them.
From make: make bench BENCH_ARGS='--quick --args distill_cost="--steps 10"'.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
# datatrove_baseline.py: shard_throughput.py runs it (alone it needs an input and a tokenizer); gpu_check.py needs a
# GPU (run it by hand on one, see its docstring; `--quick` checks it on CPU).
HELPERS = {"datatrove_baseline.py", "gpu_check.py"}
ORDER = ["input_binding", "map_balance", "shard_checksum", "checkpoint_integrity", "loader_scale",  # cheap first
         "minhash_quality", "teacher_cache", "shard_throughput", "clean_cost", "map_workers", "shard_scale",
         "train_overhead", "doc_mask_cost", "kd_memory", "distill_cost"]
QUICK = {  # small sizes: minutes on a 2-core machine, figures noisier than at the defaults
    "input_binding": ["--files", "500", "2000", "8000"],
    "map_balance": [],
    "shard_checksum": ["--batches", "256", "--repeats", "3"],
    "checkpoint_integrity": ["--mb", "16", "64", "256"],
    "loader_scale": ["--shards", "100", "400", "1000", "--rows", "1000", "--compare-shards", "128"],
    "minhash_quality": ["--mb", "2", "--docs", "600"],
    "teacher_cache": [],
    "shard_throughput": ["--mb", "2", "--docs", "150"],  # 2 MB holds about 185 distinct
    "clean_cost": ["--mb", "2"],
    "map_workers": ["--mb", "2"],
    "shard_scale": ["--scales", "1", "4", "16", "--docs", "10000"],
    "train_overhead": ["--steps", "10", "--rounds", "2", "--max-rounds", "2"],
    "doc_mask_cost": ["--seq", "512", "--repeats", "3"],
    "kd_memory": ["--vocab", "32768", "--seq", "1024"],
    "distill_cost": ["--steps", "5"],
}


def benchmarks() -> list[str]:
    """Names (without .py) of the benchmark scripts, in running order."""
    names = {p.stem for p in HERE.glob("*.py")
             if not p.name.startswith("_") and p.name not in HELPERS and p.name != Path(__file__).name}
    return [n for n in ORDER if n in names] + sorted(names - set(ORDER))


def run(name: str, args: list[str]) -> tuple[int, list[list[str]], float]:
    """Runs one script, echoing its output; returns its exit status, its BENCH fields and its seconds."""
    command = [sys.executable, str(HERE / f"{name}.py"), *args]
    print(f"\n=== {name}: {shlex.join(command)}", flush=True)
    start, figures = time.perf_counter(), []
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, bufsize=1,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            fields = line.rstrip("\n").split("\t")
            if fields[0] == "BENCH" and len(fields) == 5:
                figures.append(fields[1:])
            else:
                sys.stdout.write(line)
                sys.stdout.flush()
    return proc.returncode, figures, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="benchmarks: " + ", ".join(benchmarks()))
    parser.add_argument("--quick", action="store_true", help="small sizes for every script: " +
                        "; ".join(f"{k} {' '.join(v)}" for k, v in QUICK.items()))
    parser.add_argument("--only", action="append", metavar="NAME", help="run only this script (repeatable)")
    parser.add_argument("--args", action="append", default=[], metavar='NAME="ARGS"',
                        help="extra arguments for one script, e.g. train_overhead=\"--steps 20\" (repeatable)")
    opts = parser.parse_args()
    names = benchmarks()
    extra: dict[str, list[str]] = {}
    for item in opts.args:
        name, sep, words = item.partition("=")
        name = name.removesuffix(".py")
        if not sep or name not in names:
            parser.error(f"--args {item!r}: expected NAME=ARGS with NAME one of {', '.join(names)}")
        extra[name] = extra.get(name, []) + shlex.split(words)
    for name in opts.only or []:
        if name.removesuffix(".py") not in names:
            parser.error(f"--only {name!r}: not one of {', '.join(names)}")
    if opts.only:
        names = [n for n in names if n in {o.removesuffix(".py") for o in opts.only}]

    table = Table(title="benchmarks", title_justify="left")
    for column in ("script", "figure", "measured", "goal", "verdict"):
        table.add_column(column, justify="right" if column == "measured" else "left", overflow="fold")
    colour = {"pass": "green", "short": "red", "info": "dim", "failed": "bold red"}
    failed, counts = [], Counter()
    for name in names:
        status, figures, seconds = run(name, (QUICK.get(name, []) if opts.quick else []) + extra.get(name, []))
        for figure, measured, goal, verdict in figures:
            table.add_row(name, figure, measured, goal, f"[{colour.get(verdict, '')}]{verdict}")
            counts[verdict] += 1
        if status != 0 or not figures:
            failed.append(name)
            why = f"exit status {status}" if status != 0 else "no BENCH lines"
            table.add_row(name, f"script failed after {seconds:.0f} s ({why})", "", "", "[bold red]failed")
        table.add_section()

    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print()
    console.print(table)
    console.print(f"{counts['pass']} pass, {counts['short']} short, {counts['info']} info"
                  + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
