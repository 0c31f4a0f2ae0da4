"""One interface over submitit's backends: the real Slurm cluster and the embedded local default.

The launcher hands an `Executor` a `JobSpec`; what crosses into the job is only the small
callables in `JobSpec.tasks` (submitit pickles them), never models or data.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slurm.resources import Resources, sbatch_parameters

if TYPE_CHECKING:  # submitit loads in the methods that submit or render (status, logs, cancel never need it)
    import submitit

# Slurm states after which a job will not run again by itself. PREEMPTED is one where the site's PreemptMode
# is CANCEL; where it is REQUEUE the job is back in the queue, which squeue (asked first) reports.
TERMINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
     "PREEMPTED"}
)
# Not a Slurm state: a job still PENDING with reason DependencyNeverSatisfied (it waits afterok on a job that
# failed), which sits in the queue until cancelled: alive to the scheduler, dead to the pipeline.
NEVER_SATISFIED = "DEPENDENCY_NEVER_SATISFIED"


class SubmissionError(RuntimeError):
    """The scheduler refused or could not be reached; the message says which and why."""


@dataclass(frozen=True)
class JobSpec:
    name: str  # job name as squeue shows it
    folder: Path  # submitit's folder for this stage: pickles and per-task logs
    resources: Resources
    tasks: tuple[Callable[[], Any], ...]  # one callable: a plain job; several: one job array
    after: tuple[str, ...] = ()  # job ids that must end COMPLETED before this one starts

    @property
    def is_array(self) -> bool:
        return len(self.tasks) > 1


class Executor(ABC):
    kind: str

    @abstractmethod
    def submit(self, spec: JobSpec) -> list[submitit.Job[Any]]:
        """Submit the spec; one Job per task (array elements share the array's base id)."""

    @abstractmethod
    def render(self, spec: JobSpec) -> str:
        """What `submit` would hand the scheduler, for --dry-run."""

    @abstractmethod
    def states(self, job_ids: Sequence[str]) -> dict[str, str]:
        """Scheduler state per job id; ids the scheduler does not know are left out."""

    @abstractmethod
    def cancel(self, job_ids: Sequence[str]) -> None:
        """Cancel these jobs (array ids cancel every element)."""


def cancel_confirmed(executor: Executor, job_ids: Sequence[str], timeout_s: float = 90.0,
                     poll_s: float = 1.0) -> dict[str, str]:
    """Cancel `job_ids` and wait until the scheduler reports each one ended (or no longer knows it); returns the
    states of those still alive after `timeout_s` ({} when all ended). scancel's own exit status says little:
    only the scheduler's answer is believed, so a caller never forgets a job id that may still run."""
    executor.cancel(job_ids)
    deadline = time.monotonic() + timeout_s
    while (alive := {j: s for j, s in executor.states(job_ids).items() if s not in TERMINAL_STATES}):
        if time.monotonic() > deadline:
            return alive
        time.sleep(poll_s)
    return {}


def base_job_id(job_id: str) -> str:
    """"123_4" (array element) -> "123"."""
    return job_id.split("_", 1)[0]


class SlurmExecutor(Executor):
    kind = "slurm"

    def __init__(self, python: str = sys.executable) -> None:
        self.python = python

    def _python(self, res: Resources) -> str:
        """The interpreter each task runs, started with the stop signal ignored until a handler replaces it.

        Slurm may signal a task that is still importing (a preemption, or a time limit close to the job's
        start). USR1 and USR2 kill a process that has no handler, and --kill-on-bad-exit then ends the whole
        step: the job fails instead of requeueing. An ignored signal stays ignored across exec; submitit's
        handler replaces that once loaded, so only a signal that arrives before Python could act is dropped
        (the trainer's own time-budget check still stops before a time limit).
        """
        ignore = f'trap "" {res.signal_name} && exec "$0" "$@"'
        return f"sh -c {shlex.quote(ignore)} {shlex.quote(self.python)}"

    def _command(self, folder: Path, res: Resources) -> str:
        return f"{self._python(res)} -u -m submitit.core._submit {shlex.quote(str(folder))}"

    def render(self, spec: JobSpec) -> str:
        from submitit.slurm import slurm as submitit_slurm

        _check_folder(spec.folder)
        params = sbatch_parameters(spec.resources, spec.name, spec.after)
        array: dict[str, Any] = {"map_count": len(spec.tasks)} if spec.is_array else {}
        # submitit's own renderer, so what we print is what it submits; tests pin it to a golden file.
        return submitit_slurm._make_sbatch_string(
            command=self._command(spec.folder, spec.resources), folder=spec.folder, **params, **array
        )

    def submit(self, spec: JobSpec) -> list[submitit.Job[Any]]:
        import submitit

        _check_folder(spec.folder)
        executor = submitit.SlurmExecutor(
            folder=spec.folder, max_num_timeout=spec.resources.max_requeues, python=self._python(spec.resources)
        )
        executor.update_parameters(**sbatch_parameters(spec.resources, spec.name, spec.after))
        try:
            if not spec.is_array:
                return [executor.submit(spec.tasks[0])]
            with executor.batch():
                jobs = [executor.submit(task) for task in spec.tasks]
            return jobs
        except subprocess.CalledProcessError as e:
            stderr = (e.stderr or b"").decode(errors="replace").strip() if isinstance(e.stderr, bytes) else e.stderr
            raise SubmissionError(f"sbatch refused job {spec.name!r}: {stderr or e}") from None
        except submitit.core.utils.FailedJobError as e:
            raise SubmissionError(f"sbatch failed for job {spec.name!r}: {e}") from None

    def states(self, job_ids: Sequence[str]) -> dict[str, str]:
        """squeue for jobs still queued or running (it knows why a job pends), sacct for the ones that ended.

        Without accounting (sacct fails) the queue alone answers: a job it does not list has ended, state unknown.
        """
        if not job_ids:
            return {}
        ids = ",".join(sorted({base_job_id(j) for j in job_ids}))
        queued = parse_squeue_states(_squeue(ids))
        try:
            ended = parse_sacct_states(_run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ids],
                                            "Slurm accounting (sacct)"))
        except SubmissionError:
            return queued
        return {**ended, **queued}

    def cancel(self, job_ids: Sequence[str]) -> None:
        ids = sorted({base_job_id(j) for j in job_ids})
        if ids:
            # scancel's exit status is 0 for most failures; whether it worked is read back from the scheduler.
            subprocess.run(["scancel", *ids], capture_output=True, text=True, timeout=60, check=False)


def _squeue(ids: str) -> str:
    """squeue's lines for these jobs; "" when none is in the queue any more (squeue then fails, for one id)."""
    try:
        done = subprocess.run(["squeue", "-h", "-o", "%i|%T|%r", "-j", ids], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        raise SubmissionError(f"cannot read job states from the queue (squeue): {e}") from None
    if done.returncode != 0:
        if "Invalid job id" in done.stderr:  # asked for one job that has left the queue: sacct knows how it ended
            return ""
        raise SubmissionError(f"cannot read job states from the queue (squeue): {done.stderr.strip() or done.stdout}")
    return done.stdout


def _run(argv: list[str], what: str) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise SubmissionError(f"cannot read job states from {what}: {e}") from None


def parse_squeue_states(text: str) -> dict[str, str]:
    """`squeue -h -o "%i|%T|%r"` output -> {job id: STATE}, NEVER_SATISFIED for a job that will never start."""
    lines = []
    for line in text.splitlines():
        job_id, _, rest = line.strip().partition("|")
        state, _, reason = rest.partition("|")
        if state == "PENDING" and reason.strip() == "DependencyNeverSatisfied":
            state = NEVER_SATISFIED
        lines.append(f"{job_id}|{state}")
    return parse_sacct_states("\n".join(lines))


def parse_sacct_states(text: str) -> dict[str, str]:
    """`sacct -n -P -X -o JobID,State` output -> {job id: STATE}; "CANCELLED by 0" -> "CANCELLED".

    A pending array shows as "123_[0-3]": each element gets the array's state.
    """
    states: dict[str, str] = {}
    for line in text.splitlines():
        job_id, sep, state = line.strip().partition("|")
        if not sep:
            continue
        state = state.split()[0] if state.strip() else "UNKNOWN"
        if "_[" in job_id:
            base, _, ranges = job_id.partition("_[")
            for part in ranges.rstrip("]").split("%")[0].split(","):
                lo, _, hi = part.partition("-")
                for i in range(int(lo), int(hi or lo) + 1):
                    states[f"{base}_{i}"] = state
        else:
            states[job_id] = state
    return states


class LocalExecutor(Executor):
    """submitit's local executor: every task is a process on this machine, started at once.

    It has no dependencies between jobs, so the caller waits for one stage before the next.
    """

    kind = "local"

    def render(self, spec: JobSpec) -> str:
        shape = f"{len(spec.tasks)} array elements" if spec.is_array else f"{spec.resources.tasks} process(es)"
        return f"# local: {spec.name}: {shape} on this machine, logs in {spec.folder}\n"

    def submit(self, spec: JobSpec) -> list[submitit.Job[Any]]:
        if spec.after:
            raise SubmissionError("the local executor cannot wait on other jobs; submit after they finish")
        import submitit

        executor = submitit.LocalExecutor(folder=spec.folder, max_num_timeout=spec.resources.max_requeues)
        executor.update_parameters(
            tasks_per_node=spec.resources.tasks,  # several "nodes" become processes on this one
            timeout_min=spec.resources.time_min,
            signal_delay_s=spec.resources.signal_lead_s,
        )
        with executor.batch():
            jobs = [executor.submit(task) for task in spec.tasks]
        return jobs

    def states(self, job_ids: Sequence[str]) -> dict[str, str]:
        # Local job ids are controller pids: alive means running; the run state file knows the rest.
        states = {}
        for job_id in job_ids:
            try:
                os.kill(int(job_id), 0)
                states[job_id] = "RUNNING"
            except (ValueError, ProcessLookupError, PermissionError):
                continue
        return states

    def cancel(self, job_ids: Sequence[str]) -> None:
        for job_id in job_ids:
            try:
                os.kill(int(job_id), signal.SIGINT)  # submitit's local controller stops its tasks on SIGINT
            except (ValueError, ProcessLookupError, PermissionError):
                continue


def _check_folder(folder: Path) -> None:
    # Slurm expands %j, %t, ... in --output paths; a literal % in the folder would be mangled.
    if "%" in str(folder):
        raise SubmissionError(f"run directory path may not contain '%' (Slurm expands it): {folder}")


def make_executor(kind: str) -> Executor:
    if kind == "slurm":
        return SlurmExecutor()
    if kind == "local":
        return LocalExecutor()
    raise ValueError(f"unknown executor {kind!r}: expected 'local' or 'slurm'")
