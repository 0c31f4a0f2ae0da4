"""What a stage asks of the scheduler, and how that becomes submitit/sbatch parameters."""

from __future__ import annotations

import math
import re
import signal as signals
import unicodedata
from dataclasses import dataclass, field
from typing import Any

# Names only: submitit's task side looks the name up in the signal module, so a number would fail there.
_SIGNAL = re.compile(r"^(SIG)?(USR1|USR2|TERM|INT|HUP|URG|CONT)$")

# What submitit writes as `#SBATCH --<key>` unquoted: letters, digits and dashes only, or the line says more.
_SBATCH_KEY = re.compile(r"^[a-z0-9][a-z0-9-]*$")

# sbatch options stillroom writes itself, with the field that sets each: one set again in sbatch_extra would
# win over stillroom's, and the job would run with settings the launcher does not know (another preemption
# signal than submitit waits for, another task count, logs elsewhere).
MANAGED_SBATCH = {
    "signal": "use resources.signal and resources.signal_lead_s",
    "time": "use resources.time_min",
    "nodes": "use resources.nodes",
    "ntasks-per-node": "use resources.tasks_per_node",
    "ntasks": "use resources.nodes and resources.tasks_per_node",
    "cpus-per-task": "use resources.cpus_per_task",
    "gpus-per-node": "use resources.gpus_per_node",
    "gpus": "use resources.gpus_per_node",
    "mem": "use resources.mem_gb",
    "partition": "use resources.partition",
    "account": "use resources.account",
    "qos": "use resources.qos",
    "constraint": "use resources.constraint",
    **{name: "stillroom sets it" for name in ("dependency", "array", "output", "error", "requeue", "no-requeue",
                                              "job-name", "open-mode", "wckey")},
}
MANAGED_SBATCH["gres"] = "use resources.gres"
# sbatch's one-letter spellings of the options above.
_ALIASES = {"t": "time", "J": "job-name", "o": "output", "e": "error", "a": "array", "d": "dependency",
            "N": "nodes", "n": "ntasks-per-node", "c": "cpus-per-task", "p": "partition", "A": "account",
            "q": "qos", "C": "constraint"}


# Slurm's time formats (sbatch --time): minutes, minutes:seconds, hours:minutes:seconds, days-hours,
# days-hours:minutes, days-hours:minutes:seconds.
_SLURM_TIME = re.compile(r"^(?:(\d+)-(\d+)(?::(\d+)(?::(\d+))?)?|(\d+)(?::(\d+)(?::(\d+))?)?)$")


def slurm_minutes(text: str) -> int:
    """Minutes in a time limit written as Slurm writes it ("240", "04:00:00", "1-12", "2-00:30:00"), seconds rounded
    up to the next minute as Slurm does."""
    match = _SLURM_TIME.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a time limit: give minutes (240) or Slurm's MM:SS, HH:MM:SS, D-HH, "
                         "D-HH:MM or D-HH:MM:SS")
    days, d_hours, d_minutes, d_seconds, first, second, third = (int(g) if g else 0 for g in match.groups())
    if match.group(1) is not None:  # days-hours[:minutes[:seconds]]
        seconds = ((days * 24 + d_hours) * 60 + d_minutes) * 60 + d_seconds
    elif match.group(7) is not None:  # hours:minutes:seconds
        seconds = (first * 60 + second) * 60 + third
    else:  # minutes[:seconds]
        seconds = first * 60 + second
    return -(-seconds // 60)


def check_text(name: str, value: str) -> None:
    """Refuse control characters (newline, CR, NUL, tab, ...): in an sbatch script a newline ends the #SBATCH
    line and starts a shell command."""
    if any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in value):
        raise ValueError(f"{name} must not contain control characters such as a newline, got {value!r}")


def _check_sbatch_extra(key: str, value: str) -> None:
    check_text(f"sbatch_extra key {key!r}", key)
    check_text(f"sbatch_extra.{key}", value)
    bare = key.lstrip("-")
    if len(bare) == 1 and bare in _ALIASES:
        name = _ALIASES[bare]
        raise ValueError(f"sbatch_extra may not set {key!r} (sbatch's -{bare}, --{name}): {MANAGED_SBATCH[name]}")
    if len(bare) == 1:
        raise ValueError(f"sbatch_extra key {key!r}: give the long option name (a key is written as --{bare})")
    option = bare.replace("_", "-").lower()
    # sbatch takes any unambiguous abbreviation of a long option: `sig` is --signal.
    taken = option if option in MANAGED_SBATCH else next(
        (name for name in MANAGED_SBATCH if option and name.startswith(option)), None)
    if taken is not None:
        spelled = "" if option == taken else f" (sbatch may read it as --{taken})"
        raise ValueError(f"sbatch_extra may not set {key!r}{spelled}: {MANAGED_SBATCH[taken]}")
    if not _SBATCH_KEY.match(key.replace("_", "-")):
        raise ValueError(f"sbatch_extra key {key!r} is not a long sbatch option name without its dashes "
                         "(lower-case letters, digits, - and _), e.g. exclusive or reservation")


@dataclass(frozen=True)
class Resources:
    nodes: int = 1  # nodes per job (the local backend runs all tasks on this machine)
    tasks_per_node: int = 1  # processes per node; training uses one per GPU
    gpus_per_node: int = 0  # GPUs per node (0: no --gpus-per-node line)
    cpus_per_task: int = 1  # CPU cores per process (data loading, tokenization threads)
    mem_gb: float = 4.0  # memory per node in GB (0: the partition's default)
    time_min: int = field(default=60, metadata={"text": slurm_minutes, "notation": "Slurm time"})  # wall-clock
    # limit per job attempt: minutes, or as sbatch --time takes it ("04:00:00", "1-12")
    partition: str = ""  # Slurm partition ("" : the cluster's default)
    account: str = ""  # Slurm account to charge ("" : your default account)
    qos: str = ""  # quality of service ("" : the default)
    constraint: str = ""  # node features, e.g. "a100|h100" ("" : any node)
    gres: str = ""  # generic resources per node as sbatch --gres, e.g. "gpu:a100:4" (a GPU type; then gpus_per_node 0)
    setup: tuple[str, ...] = ()  # shell lines run before the job, e.g. "module load cuda/12.4"
    sbatch_extra: dict[str, str] = field(default_factory=dict)  # extra sbatch options, e.g. {exclusive = ""}
    signal: str = "USR2"  # signal Slurm sends before the time limit or on preemption
    signal_lead_s: int = 120  # seconds between that signal and the kill: must exceed a checkpoint's time
    max_requeues: int = 3  # times a job may requeue itself after a time-out (preemptions do not count)
    array_parallelism: int = 0  # most array elements running at once (0: no limit)

    def __post_init__(self) -> None:
        for name in ("nodes", "tasks_per_node", "cpus_per_task", "time_min"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("gpus_per_node", "signal_lead_s", "max_requeues", "array_parallelism"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if not _SIGNAL.match(self.signal):
            raise ValueError(f"signal must be a signal name such as USR2, got {self.signal!r}")
        if not (math.isfinite(self.mem_gb) and self.mem_gb >= 0):
            raise ValueError(f"mem_gb must be 0 or more, got {self.mem_gb}")
        if self.signal_lead_s >= self.time_min * 60:
            raise ValueError(f"signal_lead_s ({self.signal_lead_s}) must be shorter than time_min "
                             f"({self.time_min} min = {self.time_min * 60} s)")
        for name in ("partition", "account", "qos", "constraint", "gres"):
            check_text(name, getattr(self, name))
        if self.gpus_per_node and re.match(r"^(.*,)?gpu(:|$)", self.gres):
            raise ValueError(f"gres {self.gres!r} asks for GPUs and gpus_per_node ({self.gpus_per_node}) too: "
                             "give one of them (gres to name a GPU type)")
        for i, line in enumerate(self.setup):
            check_text(f"setup[{i}]", line)
        for key, value in self.sbatch_extra.items():
            _check_sbatch_extra(key, value)

    @property
    def signal_name(self) -> str:
        """The signal as submitit expects it in SUBMITIT_PREEMPT_SIGNAL (no SIG prefix)."""
        return self.signal.removeprefix("SIG")

    @property
    def signal_number(self) -> signals.Signals:
        return signals.Signals["SIG" + self.signal_name]

    @property
    def tasks(self) -> int:
        return self.nodes * self.tasks_per_node


def sbatch_parameters(res: Resources, job_name: str, after: tuple[str, ...] = ()) -> dict[str, Any]:
    """submitit SlurmExecutor parameters for these resources (only the lines that say something)."""
    params: dict[str, Any] = {
        "job_name": job_name,
        "time": res.time_min,
        "nodes": res.nodes,
        "ntasks_per_node": res.tasks_per_node,
        "cpus_per_task": res.cpus_per_task,
        "signal_delay_s": res.signal_lead_s,
        # The task side reads the signal name from this variable when submitit is imported.
        "setup": [f"export SUBMITIT_PREEMPT_SIGNAL={res.signal_name}", *res.setup],
        "wckey": "stillroom",
        # One rank that dies (OOM, SIGKILL, a node lost) ends the step, instead of leaving the others
        # blocked in a collective until the 30-minute distributed timeout.
        "srun_args": ["--kill-on-bad-exit=1"],
    }
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    if res.mem_gb:
        params["mem"] = f"{int(res.mem_gb)}GB" if res.mem_gb == int(res.mem_gb) else f"{int(res.mem_gb * 1024)}MB"
    for name in ("partition", "account", "qos", "constraint", "gres"):
        if value := getattr(res, name):
            params[name] = value
    if res.array_parallelism:
        params["array_parallelism"] = res.array_parallelism
    if after:
        params["dependency"] = "afterok:" + ":".join(after)
    extra: dict[str, Any] = {"signal": f"{res.signal_name}@{res.signal_lead_s}"}
    # sbatch flags without a value (e.g. --exclusive) are written as `exclusive = ""` in TOML.
    extra.update({k: (True if v == "" else v) for k, v in res.sbatch_extra.items()})
    params["additional_parameters"] = extra
    return params
