"""Fakes at the process boundary, for fast unit tests of what the launcher decides.

`FakeExecutor` stands where sbatch, sacct and scancel would be: it records every `JobSpec` it is handed,
hands out increasing job ids the way submitit's Slurm backend does ("1000", and "1001_0", "1001_1", ...
for a job array), and reports whatever scheduler state a test sets. Nothing runs: the launcher, the run
directory and the config under test are the real ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from submitit.core.utils import FailedJobError

from slurm.executor import TERMINAL_STATES, Executor, JobSpec, SubmissionError, base_job_id
from slurm.resources import Resources


@dataclass(frozen=True)
class Submission:
    """One accepted `submit` call, as the scheduler would have seen it."""

    name: str
    folder: Path
    resources: Resources
    tasks: int  # callables in the spec: 1 for a plain job, the element count for an array
    is_array: bool
    after: tuple[str, ...]
    job_ids: tuple[str, ...]
    stage: str | None  # read from the launcher's StageTask callables, when that is what the spec holds
    step: str | None
    spec: JobSpec

    @property
    def base_id(self) -> str:
        return base_job_id(self.job_ids[0])


class FakeJob:
    """What `launch` uses of a submitit Job: `job_id`, and `results()` when it waits."""

    def __init__(self, executor: FakeExecutor, job_id: str, task: Callable[[], Any]) -> None:
        self._executor, self.job_id, self.task = executor, job_id, task

    @property
    def state(self) -> str:
        return self._executor.state_of(self.job_id)

    def done(self) -> bool:
        """Whether `results()` would return now without waiting, as submitit's `done()` says: always here, since a
        fake job's outcome is decided when it is waited on (its state stays what the test set meanwhile)."""
        return True

    def results(self) -> list[Any]:
        """Runs nothing unless the test gave an `on_results` hook; a job the test failed raises like submitit."""
        return [self._executor._finish(self)]

    def result(self) -> Any:
        return self.results()[0]

    def __repr__(self) -> str:
        return f"FakeJob({self.job_id!r}, {self.state})"


class FakeExecutor(Executor):
    """An `Executor` whose scheduler is a dict. Default state of a submitted job: PENDING.

    kind:        what `launch` writes into state.json and compares with earlier submissions ("slurm" by default).
    first_id:    the first job id handed out; every submit takes the next one.
    on_results:  called with each FakeJob whose `results()` the launcher waits on (wait=True), e.g. to record
                 the task as done in the run directory the way the real task would; its return is the result.
    """

    def __init__(self, kind: str = "slurm", first_id: int = 1000,
                 on_results: Callable[[FakeJob], Any] | None = None) -> None:
        self.kind = kind
        self._next_id = first_id
        self._states: dict[str, str] = {}
        self._failures: dict[str, str] = {}
        self._refusals: dict[str, str] = {}
        self.on_results = on_results
        self.submissions: list[Submission] = []
        self.refused: list[JobSpec] = []  # specs that `refuse` made fail, in order
        self.cancelled: list[str] = []  # ids passed to cancel, in order
        self.state_queries: list[tuple[str, ...]] = []  # ids passed to states, one tuple per call
        self.rendered: list[JobSpec] = []

    # ---- what tests set ----

    def set_state(self, job_id: str, state: str) -> None:
        """Scheduler state of a job id; a plain id that is an array's base id sets every element we know."""
        elements = [j for j in self._states if "_" in j and base_job_id(j) == job_id]
        for j in elements or [job_id]:
            self._states[j] = state

    def fail(self, job_id: str, message: str = "task raised") -> None:
        """Make `results()` of this job (a base id: of every element) raise submitit's FailedJobError, and its
        state FAILED from then on. Works before the job is submitted: ids are handed out from `first_id` on."""
        self._failures[job_id] = message

    def refuse(self, job_name: str, message: str = "sbatch: error: Batch job submission failed") -> None:
        """Make `submit` raise SubmissionError (as SlurmExecutor does when sbatch refuses) for this job name."""
        self._refusals[job_name] = message

    def accept(self, job_name: str) -> None:
        """Undo `refuse`: the scheduler takes this job name again."""
        self._refusals.pop(job_name, None)

    # ---- what tests read ----

    def state_of(self, job_id: str) -> str:
        return self._states.get(job_id, "UNKNOWN")

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.submissions]

    def by_name(self, name: str) -> Submission:
        (found,) = [s for s in self.submissions if s.name == name]
        return found

    # ---- the Executor interface ----

    def submit(self, spec: JobSpec) -> list[Any]:
        if spec.name in self._refusals:
            self.refused.append(spec)
            raise SubmissionError(f"sbatch refused job {spec.name!r}: {self._refusals[spec.name]}")
        base = str(self._next_id)
        self._next_id += 1
        ids = [f"{base}_{i}" for i in range(len(spec.tasks))] if spec.is_array else [base]
        for job_id in ids:
            self._states[job_id] = "PENDING"
        first = spec.tasks[0]
        self.submissions.append(Submission(
            name=spec.name, folder=spec.folder, resources=spec.resources, tasks=len(spec.tasks),
            is_array=spec.is_array, after=tuple(spec.after), job_ids=tuple(ids),
            stage=getattr(first, "stage", None), step=getattr(first, "step", None), spec=spec))
        return [FakeJob(self, job_id, task) for job_id, task in zip(ids, spec.tasks, strict=True)]

    def render(self, spec: JobSpec) -> str:
        self.rendered.append(spec)
        return f"# fake: {spec.name}: {len(spec.tasks)} task(s) after {','.join(spec.after) or 'nothing'}\n"

    def states(self, job_ids: Sequence[str]) -> dict[str, str]:
        """Like sacct on the base ids: every known element of each array asked about; unknown ids left out."""
        self.state_queries.append(tuple(job_ids))
        bases = {base_job_id(j) for j in job_ids}
        return {j: s for j, s in self._states.items() if base_job_id(j) in bases}

    def cancel(self, job_ids: Sequence[str]) -> None:
        self.cancelled.extend(job_ids)
        bases = {base_job_id(j) for j in job_ids}
        for j, s in self._states.items():
            if base_job_id(j) in bases and s not in TERMINAL_STATES:
                self._states[j] = "CANCELLED"

    # ---- wait=True ----

    def _finish(self, job: FakeJob) -> Any:
        message = self._failures.get(job.job_id, self._failures.get(base_job_id(job.job_id)))
        if message is not None:
            self._states[job.job_id] = "FAILED"
            raise FailedJobError(f"Job (task=0) failed during processing with trace:\n{message}")
        result = self.on_results(job) if self.on_results is not None else None
        self._states[job.job_id] = "COMPLETED"
        return result
