"""Which stages run, in which order, with which dependencies; submission and waiting."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from submitit.core.utils import FailedJobError, UncompletedJobError

from launcher.run_config import RunConfig
from launcher.rundir import RunDir, now_iso
from launcher.stages import STAGES, StageTask, Step
from slurm.executor import TERMINAL_STATES, Executor, JobSpec, SubmissionError, base_job_id


class PreflightError(ValueError):
    """A stage's inputs are unusable; found before any job was submitted."""


class StageFailed(RuntimeError):
    """A stage's job ended without completing; the message names the stage and the log."""


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


def _live_jobs(executor: Executor, entry: dict[str, Any]) -> list[str]:
    """Job ids of an earlier submission that the scheduler still runs or will run."""
    if entry.get("executor") != executor.kind or entry.get("status") not in ("submitted", "running"):
        return []
    states = executor.states(entry.get("job_ids", []))
    return [j for j, s in states.items() if s not in TERMINAL_STATES]


def preflight(cfg: RunConfig) -> None:
    """Every stage's own input checks, so a typo fails now and not hours later in the queue."""
    for stage in cfg.run.stages:
        try:
            STAGES[stage].preflight(cfg)
        except ValueError as e:
            raise PreflightError(f"{stage}: {e}") from None


def launch(cfg: RunConfig, run: RunDir, executor: Executor, *, wait: bool, console: Console) -> None:
    """Submit every stage not yet completed. With `wait`, each stage must end before the next is
    submitted (the local executor has no dependencies); otherwise stages chain with afterok."""
    after: tuple[str, ...] = ()
    for stage in cfg.run.stages:
        entry = run.read_state()["stages"].get(stage, {})
        if entry.get("status") == "completed":
            console.print(f"[green]✓[/] {stage}: completed earlier, skipped")
            continue
        if live := _live_jobs(executor, entry):
            console.print(f"[yellow]…[/] {stage}: jobs {', '.join(live)} already queued or running, not resubmitted")
            after = tuple(sorted({base_job_id(j) for j in live}))
            continue
        run.update_stage(stage, status="submitted", executor=executor.kind, job_ids=[], tasks_done=[],
                         tasks=task_count(cfg, stage), submitted_at=now_iso(), error=None)
        for step in STAGES[stage].steps:
            try:
                jobs = executor.submit(job_spec(cfg, run, stage, step, after=() if wait else after))
            except SubmissionError as e:
                run.update_stage(stage, status="failed", error=str(e), finished_at=now_iso())
                raise
            ids = [job.job_id for job in jobs]
            run.update_stage(stage, job_ids=run.read_state()["stages"][stage]["job_ids"] + ids)
            label = stage if step.name == stage else f"{stage}.{step.name}"
            console.print(f"[cyan]→[/] {label}: submitted as {executor.kind} job {', '.join(ids)}")
            after = tuple(sorted({base_job_id(j) for j in ids}))
            if wait:
                _wait(run, stage, jobs, console)
        if wait:
            _check_completed(run, stage, console)


def _wait(run: RunDir, stage: str, jobs: list[Any], console: Console) -> None:
    with console.status(f"{stage}: running {len(jobs)} job(s); logs in {run.log_dir(stage)}"):
        for job in jobs:
            try:
                job.results()
            except (FailedJobError, UncompletedJobError) as e:
                entry = run.read_state()["stages"][stage]
                # The failing task records its own error; a job killed from outside cannot.
                error = entry.get("error") if entry["status"] == "failed" else None
                if error is None:
                    error = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                    run.update_stage(stage, status="failed", error=error, finished_at=now_iso())
                raise StageFailed(f"stage {stage!r} failed in job {job.job_id}: {error} "
                                  f"(full log: stillroom logs {run.path} {stage})") from None


def _check_completed(run: RunDir, stage: str, console: Console) -> None:
    status = run.read_state()["stages"][stage]["status"]
    if status != "completed":
        raise StageFailed(f"stage {stage!r} ended with status {status!r} (stillroom logs {run.path} {stage})")
    console.print(f"[green]✓[/] {stage}: completed")
    if (summary := STAGES[stage].summary) is not None:
        console.print(summary(run.stage_dir(stage)))
