"""Where a task stands in its job: ranks, nodes, rendezvous address, attempt, end time.

Every stage gets its `TaskEnv` from `task_env()`, whichever way it was started: a Slurm job step
(srun), submitit's local executor, torchrun-style variables, or a plain single process.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TaskEnv:
    launcher: str  # "slurm", "local", "torchrun" or "single"
    rank: int  # global rank of this process
    local_rank: int  # rank on this node (selects the GPU)
    world_size: int  # processes in the job
    node_rank: int  # index of this node in the job's node list
    num_nodes: int
    nodes: tuple[str, ...]  # host names of the job, in Slurm's order
    master_addr: str  # rendezvous host for torch.distributed: the job's first node
    master_port: int  # rendezvous port, derived from the job id so concurrent jobs differ
    job_id: str
    restart_count: int  # 0 on the first attempt, +1 per requeue
    end_time: float | None  # unix time the scheduler will stop this attempt, if known

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def torch_env(self) -> dict[str, str]:
        """The variables torch.distributed's env:// rendezvous reads."""
        return {
            "RANK": str(self.rank),
            "LOCAL_RANK": str(self.local_rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_WORLD_SIZE": str(self.world_size // max(self.num_nodes, 1)),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


def expand_hostlist(text: str) -> list[str]:
    """Expand a Slurm host list: "gpu[01-03,7],login" -> ["gpu01", "gpu02", "gpu03", "gpu7", "login"]."""
    hosts: list[str] = []
    for group in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,\[]*", text):
        match = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", group)
        if not match:
            hosts.append(group)
            continue
        prefix, ranges, suffix = match.groups()
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(f"{prefix}{lo}{suffix}")
                continue
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise ValueError(f"bad range {part!r} in Slurm host list {text!r}")
            hosts.extend(f"{prefix}{n:0{len(lo)}d}{suffix}" for n in range(int(lo), int(hi) + 1))
    return hosts


def port_for_job(job_id: str) -> int:
    """A port in 20000-29999 chosen by the job id: ranks agree on it without talking."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return 20000 + int(digits) % 10000


def _int(env: Mapping[str, str], key: str, default: int) -> int:
    value = env.get(key, "")
    return int(value) if value.strip().isdigit() else default


def _slurm_end_time(env: Mapping[str, str]) -> float | None:
    if end := env.get("SLURM_JOB_END_TIME", "").strip():
        return float(end)
    return None


def slurm_job_end_time(job_id: str) -> float | None:
    """Ask slurmctld when this job attempt ends (Slurm < 23.02 does not export SLURM_JOB_END_TIME).

    One call per job, from the rank that manages the time budget, not one per rank.
    """
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%e"], capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()
        return time.mktime(time.strptime(out, "%Y-%m-%dT%H:%M:%S"))
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc): what a resume costs, imports included."""
    try:
        after_name = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(after_name[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime, in clock ticks
        return float(Path("/proc/uptime").read_text().split()[0]) - started
    except (OSError, ValueError, IndexError):
        return None


def scheduler_job_id(env: Mapping[str, str] | None = None) -> str | None:
    """This task's job as the scheduler and the launcher's records name it: "123", "123_4" for an element of
    a Slurm job array (whose SLURM_JOB_ID is a number of its own), the controller's pid for the local
    executor; None outside both."""
    env = os.environ if env is None else env
    if "SLURM_ARRAY_JOB_ID" in env and "SLURM_ARRAY_TASK_ID" in env:
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or env.get("SUBMITIT_LOCAL_JOB_ID")


def task_env(env: Mapping[str, str] | None = None) -> TaskEnv:
    """The task environment of this process, from its environment variables."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env and "MASTER_ADDR" in env:
        world = _int(env, "WORLD_SIZE", 1)
        per_node = _int(env, "LOCAL_WORLD_SIZE", world)
        host = env["MASTER_ADDR"]
        return TaskEnv(
            launcher="torchrun",
            rank=_int(env, "RANK", 0),
            local_rank=_int(env, "LOCAL_RANK", 0),
            world_size=world,
            node_rank=_int(env, "GROUP_RANK", _int(env, "RANK", 0) // max(per_node, 1)),
            num_nodes=max(world // max(per_node, 1), 1),
            nodes=(host,),
            master_addr=host,
            master_port=_int(env, "MASTER_PORT", 29500),
            job_id=env.get("TORCHELASTIC_RUN_ID", "torchrun"),
            restart_count=_int(env, "TORCHELASTIC_RESTART_COUNT", 0),
            end_time=None,
        )
    if "SUBMITIT_LOCAL_JOB_ID" in env:
        job_id = env["SUBMITIT_LOCAL_JOB_ID"]
        timeout_s = _int(env, "SUBMITIT_LOCAL_TIMEOUT_S", 0)
        return TaskEnv(
            launcher="local",
            rank=_int(env, "SUBMITIT_LOCAL_GLOBALID", 0),
            local_rank=_int(env, "SUBMITIT_LOCAL_LOCALID", 0),
            world_size=_int(env, "SUBMITIT_LOCAL_NTASKS", 1),
            node_rank=0,
            num_nodes=1,
            nodes=("127.0.0.1",),
            master_addr="127.0.0.1",
            master_port=port_for_job(job_id),
            job_id=job_id,
            restart_count=0,  # the local backend does not requeue across processes
            end_time=time.time() + timeout_s if timeout_s else None,
        )
    if "SLURM_PROCID" in env and "SLURM_JOB_ID" in env:
        nodes = tuple(expand_hostlist(env.get("SLURM_JOB_NODELIST", ""))) or (socket.gethostname(),)
        job_id = env["SLURM_JOB_ID"]
        return TaskEnv(
            launcher="slurm",
            rank=_int(env, "SLURM_PROCID", 0),
            local_rank=_int(env, "SLURM_LOCALID", 0),
            world_size=_int(env, "SLURM_NTASKS", 1),
            node_rank=_int(env, "SLURM_NODEID", 0),
            num_nodes=_int(env, "SLURM_JOB_NUM_NODES", len(nodes)),
            nodes=nodes,
            master_addr=nodes[0],
            master_port=port_for_job(job_id),
            job_id=job_id,
            restart_count=_int(env, "SLURM_RESTART_COUNT", 0),
            end_time=_slurm_end_time(env),
        )
    return TaskEnv(
        launcher="single",
        rank=0,
        local_rank=0,
        world_size=1,
        node_rank=0,
        num_nodes=1,
        nodes=("127.0.0.1",),
        master_addr="127.0.0.1",
        master_port=port_for_job(str(os.getpid())),
        job_id=str(os.getpid()),
        restart_count=0,
        end_time=None,
    )
