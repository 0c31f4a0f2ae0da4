"""Which stages run, in which order, with which dependencies; submission and waiting."""

from __future__ import annotations

import json
import re
import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from submitit.core.utils import FailedJobError, UncompletedJobError

from common.missing import MissingInput
from launcher.run_config import RunConfig
from launcher.rundir import RunDir, now_iso
from launcher.stages import STAGES, StageTask, Step
from launcher.status import progress_line
from slurm.executor import (
    NEVER_SATISFIED,
    TERMINAL_STATES,
    Executor,
    JobSpec,
    SubmissionError,
    base_job_id,
    cancel_confirmed,
)


class PreflightError(ValueError):
    """A stage's inputs are unusable; found before any job was submitted."""


class StageFailed(RuntimeError):
    """A stage's job ended without completing; the message names the stage and the log."""


class StageStopped(StageFailed):
    """A stage saved its state and left for a requeue (a stop signal, the time budget); running the same
    command again resumes it. The message says where it stopped and gives that command."""


def job_spec(cfg: RunConfig, run: RunDir, stage: str, step: Step, after: tuple[str, ...] = ()) -> JobSpec:
    array = step.array_size(cfg)
    tasks = tuple(StageTask(stage, step.name, str(run.path), i) for i in range(array)) if array else (
        StageTask(stage, step.name, str(run.path)),)
    name = f"{cfg.run.name}.{stage}" + (f".{step.name}" if step.name != stage else "")
    return JobSpec(name=name, folder=run.log_dir(stage), resources=step.resources(cfg.stage_resources(stage)),
                   tasks=tasks, after=after)


def task_count(cfg: RunConfig, stage: str) -> int:
    """How many tasks, over all steps, report done before the stage counts as completed."""
    return sum(step.task_count(cfg, cfg.stage_resources(stage)) for step in STAGES[stage].steps)


def _scheduler_view(executor: Executor, entry: dict[str, Any]) -> dict[str, str]:
    """The scheduler's state of every job id the stage recorded (ids it no longer knows have ended)."""
    if entry.get("executor") != executor.kind or not entry.get("job_ids"):
        return {}
    return executor.states(entry["job_ids"])


def _alive(entry: dict[str, Any], states: dict[str, str]) -> list[str]:
    """Recorded jobs that still run or will run by themselves. A stage's steps are chained afterok in the order
    recorded, so once a step has a job that failed (or waits on one that did), the PENDING jobs of every later
    step will never start: only the first of them is marked DependencyNeverSatisfied by Slurm, the steps behind
    it just wait on it."""
    alive, dead_step = [], None
    for job in entry.get("job_ids", []):
        state = states.get(job)
        if state is None:
            continue  # the scheduler no longer knows it: ended
        step = base_job_id(job)
        if state == NEVER_SATISFIED or (state in TERMINAL_STATES and state != "COMPLETED"):
            dead_step = dead_step or step
        elif state not in TERMINAL_STATES and not (dead_step and step != dead_step and state == "PENDING"):
            alive.append(job)
    return alive


# What each way of ending means for the user; the rerun resubmits the stage, which resumes from its saved state.
_ENDED = {"FAILED": "failed", "CANCELLED": "was cancelled", "TIMEOUT": "ran out of time (and of requeues)",
          "PREEMPTED": "was preempted and not requeued (the site's PreemptMode is CANCEL)",
          "NODE_FAIL": "lost a node", "OUT_OF_MEMORY": "ran out of memory", "BOOT_FAIL": "could not boot its node",
          "DEADLINE": "passed its deadline", NEVER_SATISFIED: "waited on a job that failed (DependencyNeverSatisfied)",
          "COMPLETED": "ended without every task reporting done"}


def _what_happened(entry: dict[str, Any], states: dict[str, str]) -> str:
    ended = {j: states.get(j, "") for j in entry.get("job_ids", [])}
    told = [f"job {j} {_ENDED.get(s, 'ended')}" + (f" ({s})" if s else "") for j, s in ended.items()
            if s != "COMPLETED" or len(ended) == 1][:3]
    return "; ".join(told) or f"its last submission ended as {entry.get('status')}"


def _cancel_confirmed(executor: Executor, job_ids: list[str]) -> None:
    if alive := cancel_confirmed(executor, job_ids):
        raise StageFailed(f"cancelled jobs {', '.join(alive)} but the scheduler still reports them "
                          f"{', '.join(sorted(set(alive.values())))}; run the same command again once they have "
                          "ended")


def preflight(cfg: RunConfig, missing_ok: bool = False) -> list[str]:
    """Every stage's own input checks, so a typo fails now and not hours later in the queue: stages in pipeline
    order, and each reading only what exists or what a stage before it in this run makes.

    With `missing_ok` (a dry run), a stage whose data is not there yet (MissingInput) is a warning, returned as
    one line per stage; that stage's checks after the missing path are not made. Anything else still fails."""
    warnings: list[str] = []
    order = [s for s in STAGES if s != "probe"]  # each reads what the ones before it write; probe reads nothing
    listed = [s for s in cfg.run.stages if s != "probe"]
    for before, after in zip(listed, listed[1:], strict=False):
        if order.index(before) > order.index(after):
            raise PreflightError(f"run.stages must follow the pipeline order {', '.join(order)} (probe anywhere): "
                                 f"'{after}' is listed after '{before}' in {list(cfg.run.stages)}")
    for stage in cfg.run.stages:
        try:
            STAGES[stage].preflight(cfg)
        except MissingInput as e:
            if not missing_ok:
                raise PreflightError(f"{stage}: {e}") from None
            warnings.append(f"{stage}: {e}")
        except ValueError as e:
            raise PreflightError(f"{stage}: {e}") from None
    return warnings


def launch(cfg: RunConfig, run: RunDir, executor: Executor, *, wait: bool, console: Console,
           command: str = "the same command") -> None:
    """Submit every stage not yet completed. With `wait`, each stage must end before the next is
    submitted (the local executor has no dependencies); otherwise stages chain with afterok.

    Each stage is decided under the run lock, from every job id it recorded, whatever its recorded status:
    jobs that still run are kept (and chained on); a stage whose jobs ended without completing is
    resubmitted; once one stage is resubmitted, later stages' queued jobs wait on its dead jobs, so they are
    cancelled (confirmed by the scheduler) and resubmitted after the new ones.
    """
    after: tuple[str, ...] = ()
    upstream_new = False
    for stage in cfg.run.stages:
        with run.locked():
            entry = run.read_state()["stages"].get(stage, {})
            if entry.get("status") == "completed":
                console.print(f"[green]✓[/] {stage}: completed earlier, skipped")
                continue
            states = _scheduler_view(executor, entry)
            alive = _alive(entry, states)
            if alive and not upstream_new:
                if entry.get("status") == "failed":  # one array element failed while its siblings still run
                    error = escape(entry.get("error") or "failed")  # an error may hold [brackets] rich would parse
                    console.print(f"[red]✗[/] {stage}: {error}; jobs {', '.join(alive)} "
                                  f"still run, so nothing is resubmitted: run the same command again once they "
                                  f"end (stillroom status {run.path})")
                    return
                if wait:  # another `stillroom run` is running it: starting later stages here would race it
                    console.print(f"[yellow]…[/] {stage}: jobs {', '.join(alive)} are running under another "
                                  f"stillroom command; follow them with: stillroom status {run.path}")
                    return
                console.print(f"[yellow]…[/] {stage}: jobs {', '.join(alive)} already queued or running, "
                              "not resubmitted")
                after = tuple(sorted({base_job_id(j) for j in alive}))
                continue
            if doomed := [j for j in entry.get("job_ids", []) if j in states and states[j] not in TERMINAL_STATES]:
                why = "waited on jobs of an earlier stage that was resubmitted" if upstream_new else \
                    "waited on a job that failed"
                _cancel_confirmed(executor, doomed)
                console.print(f"[yellow]↻[/] {stage}: cancelled jobs {', '.join(doomed)}, which {why}")
            elif entry.get("job_ids"):
                console.print(f"[yellow]↻[/] {stage}: {escape(_what_happened(entry, states))}; resubmitting: it "
                              "resumes from its last valid state")
            past = entry.get("past_job_ids", []) + entry.get("job_ids", [])  # all ended: kept, never dropped
            run.update_stage(stage, status="submitted", executor=executor.kind, job_ids=[], past_job_ids=past,
                             tasks_done=[], tasks=task_count(cfg, stage), submitted_at=now_iso(), error=None)
            steps = STAGES[stage].steps
            jobs, after = _submit_steps(cfg, run, executor, stage, steps[:1] if wait else steps,
                                        () if wait else after, console)
            upstream_new = True
        if wait:  # no dependencies here: each step ends before the next is submitted (the lock is not held meanwhile)
            _wait(run, stage, jobs, console, command)
            for step in steps[1:]:
                with run.locked():
                    jobs, _ = _submit_steps(cfg, run, executor, stage, (step,), (), console)
                _wait(run, stage, jobs, console, command)
            _check_completed(run, stage, console)


def _submit_steps(cfg: RunConfig, run: RunDir, executor: Executor, stage: str, steps: tuple[Step, ...],
                  after: tuple[str, ...], console: Console) -> tuple[list[Any], tuple[str, ...]]:
    """Submit `steps` of `stage`, each after the one before, and record their job ids."""
    jobs: list[Any] = []
    for step in steps:
        try:
            step_jobs = executor.submit(job_spec(cfg, run, stage, step, after=after))
        except SubmissionError as e:
            run.update_stage(stage, status="failed", error=str(e), finished_at=now_iso())
            raise
        ids = [job.job_id for job in step_jobs]
        run.update_stage(stage, job_ids=run.read_state()["stages"][stage]["job_ids"] + ids)
        label = stage if step.name == stage else f"{stage}.{step.name}"
        console.print(f"[cyan]→[/] {label}: submitted as {executor.kind} job {', '.join(ids)}")
        after = tuple(sorted({base_job_id(j) for j in ids}))
        jobs += step_jobs
    return jobs, after


PROGRESS_POLL_S = 2.0  # how often a waiting `stillroom run` reads the stage's progress file
PROGRESS_LINE_S = 30.0  # and, writing to a pipe or a log rather than a terminal, how often it prints a line
DONE_POLL_S = 0.1  # how often it asks whether the jobs have ended (a local job: a process poll)


def _all_done(jobs: list[Any]) -> bool:
    """Whether every job has ended, as far as submitit can tell now; on doubt (the scheduler does not answer) True,
    so that `_wait` goes on to `results()`, which waits however long it takes and raises what went wrong."""
    try:
        return all(job.done() for job in jobs)
    except Exception:  # noqa: BLE001 (only the display depends on it)
        return True


def _watch(run: RunDir, stage: str, jobs: list[Any], console: Console) -> None:
    """Until every job has ended: the stage's progress (what its tasks write to progress.json for `stillroom
    status`) as the spinner's text on a terminal, else as a line every PROGRESS_LINE_S when it changed."""
    idle = f"{stage}: running {len(jobs)} job(s); logs in {run.log_dir(stage)}"
    printed, last_line, last_read = "", 0.0, 0.0
    with console.status(idle) as spinner:
        while not _all_done(jobs):
            time.sleep(DONE_POLL_S)
            if time.monotonic() - last_read < PROGRESS_POLL_S:
                continue
            last_read = time.monotonic()
            try:
                line = progress_line(json.loads(run.layout.progress(stage).read_text()))
            except (OSError, ValueError):  # not written yet, or being replaced
                continue
            if line and console.is_terminal:
                spinner.update(f"{stage}: {line}")
            elif line and line != printed and last_read - last_line >= PROGRESS_LINE_S:
                console.print(f"[dim]{stage}[/]: {escape(line)}")
                printed, last_line = line, last_read


def _wait(run: RunDir, stage: str, jobs: list[Any], console: Console, command: str) -> None:
    _watch(run, stage, jobs, console)
    for job in jobs:
        try:
            job.results()
        except (FailedJobError, UncompletedJobError) as e:
            entry = run.read_state()["stages"][stage]
            if entry["status"] == "stopped":
                raise StageStopped(_stopped(run, stage, command)) from None
            # The failing task records its own error; a job killed from outside cannot.
            error = entry.get("error") if entry["status"] == "failed" else None
            if error is None:
                error = error_line(str(e)) or type(e).__name__
                run.update_stage(stage, status="failed", error=error, finished_at=now_iso())
            raise StageFailed(f"stage {stage!r} failed in job {job.job_id}: {error} "
                              f"(full log: stillroom logs {run.path} {stage})") from None


def _stopped(run: RunDir, stage: str, command: str) -> str:
    """Where a stopped stage stands, from its progress file when it has one, and how to resume it."""
    try:
        progress = json.loads(run.layout.progress(stage).read_text())
    except (OSError, ValueError):
        progress = {}
    where = f" at step {progress['step']}" if "step" in progress else ""
    why = f" ({progress['reason']})" if progress.get("last_event") == "stop" and progress.get("reason") else ""
    saved = f"; its last checkpoint is {run.layout.checkpoints(stage) / progress['path']}" \
        if progress.get("path") else ""
    return f"stage {stage!r} stopped{where}{why} and saved its state{saved}. Resume it with: {command}"


# Progress bars (tqdm, transformers' "Loading weights") end many logs; they are never the reason.
_PROGRESS_BAR = re.compile(r"\d+%\||[█▏▎▍▌▋▊▉]|\r")
_ERROR_LINE = re.compile(r"^(\w+\.)*\w*(Error|Exception|Exit|Interrupt)\b|\b(error|fatal):", re.IGNORECASE)


def error_line(text: str) -> str:
    """The line of a failed job's output that says why: the last exception or error line, else the last line
    that is not a progress bar; "" when there is none."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not _PROGRESS_BAR.search(line)]
    return next((line for line in reversed(lines) if _ERROR_LINE.search(line)), lines[-1] if lines else "")


def _check_completed(run: RunDir, stage: str, console: Console) -> None:
    status = run.read_state()["stages"][stage]["status"]
    if status != "completed":
        raise StageFailed(f"stage {stage!r} ended with status {status!r} (stillroom logs {run.path} {stage})")
    console.print(f"[green]✓[/] {stage}: completed")
    if (summary := STAGES[stage].summary) is not None:
        console.print(summary(run.stage_dir(stage)))
