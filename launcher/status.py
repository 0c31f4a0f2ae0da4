"""status, cancel and logs: read the run directory, ask the scheduler, reconcile the two."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.table import Table

from launcher.rundir import RunDir, now_iso
from slurm.executor import TERMINAL_STATES, SubmissionError, cancel_confirmed, make_executor
from training.checkpoint_files import set_aside_checkpoints

# How a scheduler's terminal state of an unfinished stage is recorded in state.json.
_FINAL_STATUS = {"CANCELLED": "cancelled"}


def refresh(run: RunDir) -> dict[str, Any]:
    """The run state with each unfinished stage's scheduler states added (`sched`) and, where
    every job of a stage has ended without the stage completing, the stage marked failed or
    cancelled in state.json (a job killed from outside cannot say so itself)."""
    state = run.read_state()
    for stage, entry in state["stages"].items():
        if (progress := _progress(run, stage)) is not None:
            entry["progress"] = progress
        if aside := set_aside_checkpoints(run.layout.checkpoints(stage)):  # damaged ones the trainer skipped
            entry["set_aside"] = [{"checkpoint": name, "problems": problems} for name, problems in aside]
        if entry.get("status") not in ("submitted", "running", "stopped") or not entry.get("job_ids"):
            continue
        try:
            sched = make_executor(entry["executor"]).states(entry["job_ids"])
        except SubmissionError as e:
            entry["sched"] = {"?": str(e)}
            continue
        entry["sched"] = sched
        ended = [sched.get(j, "UNKNOWN") for j in entry["job_ids"]]
        if entry["executor"] == "slurm" and all(s in TERMINAL_STATES for s in ended):
            bad = sorted({s for s in ended if s != "COMPLETED"})
            if bad:
                status = _FINAL_STATUS.get(bad[0], "failed")
                run.update_stage(stage, status=status, error=f"Slurm: {', '.join(bad)}", finished_at=now_iso())
                entry.update(status=status, error=f"Slurm: {', '.join(bad)}")
    return state


def _progress(run: RunDir, stage: str) -> dict[str, Any] | None:
    """A training stage's `progress.json` (the latest step, loss, evaluation), if it wrote one."""
    try:
        return json.loads(run.layout.progress(stage).read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


def _progress_cells(p: dict[str, Any] | None, running: bool) -> list[str]:
    """step/total, tokens, last loss, validation perplexity (domain / general), ETA, forgetting alarm."""
    if not p:
        return ["", "", "", "", "", ""]
    ppl = " / ".join(f"{p[k]:.2f}" for k in ("domain_ppl", "general_ppl") if isinstance(p.get(k), float))
    eta = ""
    if running and isinstance(p.get("eta_s"), (int, float)):
        age = time.time() - p.get("updated", time.time())
        eta = f"{max(p['eta_s'] - age, 0) / 60:.1f} min"
    alarm = ""
    if p.get("forgetting_alarm"):
        alarm = f"[red]general ppl +{p.get('forgetting_pct', 0):.1f}%[/]"
    loss = f"{p['loss']:.4f}" if isinstance(p.get("loss"), float) else ""
    return [f"{p.get('step', 0)}/{p.get('total_steps', '?')}", f"{p.get('tokens', 0):,}", loss, ppl, eta, alarm]


def progress_line(p: dict[str, Any] | None) -> str:
    """A training stage's latest numbers in one line ("" before its first): step/total, loss, tokens/s, ETA."""
    if not p or "step" not in p:
        return ""
    parts = [f"step {p['step']}/{p.get('total_steps', '?')}"]
    if isinstance(p.get("loss"), float):
        parts.append(f"loss {p['loss']:.4f}")
    if isinstance(p.get("tokens_per_s"), (int, float)):
        parts.append(f"{p['tokens_per_s']:,.0f} tok/s")
    if isinstance(p.get("eta_s"), (int, float)):
        age = time.time() - p.get("updated", time.time())
        parts.append(f"ETA {max(p['eta_s'] - age, 0) / 60:.1f} min")
    if p.get("last_event") in ("eval", "checkpoint", "stop"):
        parts.append(f"last: {p['last_event']}")
    return ", ".join(parts)


def status_table(run: RunDir, state: dict[str, Any]) -> Table:
    table = Table(title=f"run {state['run']}  ({run.path})", title_justify="left")
    for column in ("stage", "status", "jobs", "scheduler", "tasks done", "requeues", "step", "tokens", "loss",
                   "val ppl (domain / general)", "ETA", "forgetting", "finished", "error"):
        table.add_column(column, overflow="fold")
    colours = {"completed": "green", "failed": "red", "cancelled": "magenta", "running": "cyan"}
    for stage, e in state["stages"].items():
        sched = e.get("sched", {})
        table.add_row(
            stage, f"[{colours.get(e['status'], 'yellow')}]{e['status']}[/]",
            f"{e.get('executor', '')} {', '.join(e.get('job_ids', []))}",
            ", ".join(sorted(set(sched.values()))) if sched else "",
            f"{len(e.get('tasks_done', []))}/{e.get('tasks', '?')}", str(max(e.get("attempts", 0) - 1, 0)),
            *_progress_cells(e.get("progress"), e["status"] == "running"),
            _short(e.get("finished_at")), e.get("error") or "",
        )
    warnings = [f"[yellow]warning[/]: {stage}: checkpoint {bad['checkpoint']} was set aside as damaged"
                + (f" ({bad['problems'][0]})" if bad["problems"] else "") + "; kept for inspection, delete it when done"
                for stage, e in state["stages"].items() for bad in e.get("set_aside", [])]
    if warnings:
        table.caption, table.caption_justify = "\n".join(warnings), "left"
    return table


def _short(stamp: str | None) -> str:
    """"2026-11-28T03:33:18Z" -> "11-28 03:33:18" (UTC), to keep the table narrow."""
    return stamp[5:19].replace("T", " ") if stamp else ""


def cancel(run: RunDir, timeout_s: float = 90.0) -> tuple[list[str], list[str]]:
    """Cancel every job of every unfinished stage, under the run lock. A stage is recorded cancelled only once
    the scheduler reports all its jobs ended; returns (job ids confirmed ended, job ids still reported alive)."""
    with run.locked():
        entries = {s: e for s, e in run.read_state()["stages"].items()
                   if e.get("status") not in ("completed", "cancelled") and e.get("job_ids")}
        alive: set[str] = set()
        for kind in {e["executor"] for e in entries.values()}:  # every job of one scheduler cancelled at once
            ids = [j for e in entries.values() if e["executor"] == kind for j in e["job_ids"]]
            alive |= set(cancel_confirmed(make_executor(kind), ids, timeout_s))
        for stage, entry in entries.items():
            if not alive & set(entry["job_ids"]):
                run.update_stage(stage, status="cancelled", error="cancelled by stillroom cancel",
                                 finished_at=now_iso())
    ids = [j for e in entries.values() for j in e["job_ids"]]
    return [j for j in ids if j not in alive], [j for j in ids if j in alive]


def log_files(run: RunDir, stage: str, rank: int) -> list[Path]:
    """The stdout and stderr logs of `rank` in every job of the stage, oldest job first.

    A requeued job keeps its id and appends to the same files, so one file spans its attempts.
    """
    entry = run.read_state()["stages"].get(stage)
    if entry is None:
        raise KeyError(f"stage {stage!r} has not been submitted in {run.path}")
    folder = run.log_dir(stage)
    files: list[Path] = []
    for job_id in entry.get("job_ids", []):
        files += [p for p in (folder / f"{job_id}_{rank}_log.out", folder / f"{job_id}_{rank}_log.err") if p.exists()]
    return files


def tail_lines(path: Path, n: int, block: int = 1 << 16) -> str:
    """The last `n` lines of a file, read from its end backwards in blocks (a log may be gigabytes)."""
    with path.open("rb") as f:
        f.seek(0, 2)
        end = pos = f.tell()
        data = b""
        while pos > 0 and data.count(b"\n") <= n:
            pos = max(0, pos - block)
            f.seek(pos)
            data = f.read(end - pos)
    lines = data.decode(errors="replace").splitlines(keepends=True)
    return "".join(lines[-n:]) if n else ""


def follow(run: RunDir, stage: str, rank: int, write: Any, poll_s: float = 1.0) -> None:
    """Print what the rank's logs gain, as `tail -f` would, across requeues and new jobs, until the stage has ended
    (completed, failed, stopped, cancelled) and its files stop growing."""
    offsets: dict[Path, int] = {}
    while True:
        ended = run.read_state()["stages"].get(stage, {}).get("status") in ("completed", "failed", "stopped",
                                                                           "cancelled")
        grew = False
        for path in log_files(run, stage, rank):
            with path.open("rb") as f:
                f.seek(offsets.get(path, 0))
                if chunk := f.read():
                    write(chunk.decode(errors="replace"))
                    grew = True
                offsets[path] = f.tell()
        if ended and not grew:
            return
        time.sleep(poll_s)
