"""Shared by the benchmark scripts: the machine-readable lines that benchmarks/run_all.py collects.

Every figure a script reports is also printed as one tab-separated line on stdout:

    BENCH <figure> <measured> <goal> <verdict>

verdict is "pass" or "short" against the goal, or "info" for a figure without a goal (goal "-").
"""

from __future__ import annotations

from collections.abc import Iterable

PREFIX = "BENCH"


def bench_line(figure: str, measured: str, goal: str, ok: object) -> str:
    """One figure as a BENCH line; an empty goal means a figure reported for information only."""
    verdict = "info" if not goal else "pass" if ok else "short"
    fields = (PREFIX, figure, measured, goal or "-", verdict)
    return "\t".join(" ".join(str(field).split()) for field in fields)  # no tab or newline inside a field


def emit(rows: Iterable[tuple[str, str, str, object]]) -> None:
    """Prints (figure, measured, goal, ok) rows as BENCH lines, after a blank line."""
    print()
    for row in rows:
        print(bench_line(*row))
    print(end="", flush=True)
