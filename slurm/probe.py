"""The probe stage: each task reports its environment, optionally counts resumable steps and
checks a torch.distributed rendezvous. It proves the whole submit -> run -> resume path
before any real stage is involved, and is what to run first on a new cluster.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.publish import publish_json
from slurm.resources import Resources
from slurm.taskenv import TaskEnv


@dataclass(frozen=True)
class ProbeConfig:
    resources: Resources = field(default_factory=Resources)  # where and how big the probe job is
    array_size: int = 0  # >0: submit as a job array of this many elements instead of one job
    steps: int = 0  # count this many steps, saving the count after each, so a requeue resumes it
    step_seconds: float = 0.5  # sleep per counted step (gives a test time to requeue the job)
    collective: bool = False  # all-reduce the ranks (gloo on CPU, NCCL and its bandwidth on GPUs) to prove rendezvous
    fail_rank: int = -1  # this rank raises on purpose (-1: none), to see how a failure is reported

    def __post_init__(self) -> None:
        for name in ("array_size", "steps", "step_seconds"):
            if not getattr(self, name) >= 0:  # nan too
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.step_seconds == float("inf"):
            raise ValueError("step_seconds must be finite, got inf")
        if self.fail_rank < -1:
            raise ValueError(f"fail_rank must be a rank or -1 (none), got {self.fail_rank}")


def _all_reduce_ranks(env: TaskEnv) -> dict[str, Any]:
    """The sum of the ranks over torch.distributed: gloo on CPU; on GPUs NCCL, the backend training uses, so the
    probe catches an NCCL or InfiniBand problem before a training job does, plus the bus bandwidth of a 256 MB
    all-reduce (a fabric that silently fell back to TCP shows as a few GB/s instead of tens)."""
    import torch
    import torch.distributed as dist

    gpu = torch.cuda.is_available()
    device = torch.device("cuda", env.local_rank) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if gpu else "gloo", init_method=f"tcp://{env.master_addr}:{env.master_port}",
                            rank=env.rank, world_size=env.world_size)
    try:
        total = torch.tensor([env.rank], dtype=torch.int64, device=device)
        dist.all_reduce(total)
        result: dict[str, Any] = {"rank_sum": int(total.item()), "backend": dist.get_backend()}
        if gpu:
            buffer = torch.ones(64 << 20, dtype=torch.float32, device=device)  # 256 MB
            dist.all_reduce(buffer)  # warm-up: NCCL sets its rings and channels up on first use
            torch.cuda.synchronize()
            start, repeats = time.perf_counter(), 5
            for _ in range(repeats):
                dist.all_reduce(buffer)
            torch.cuda.synchronize()
            seconds = (time.perf_counter() - start) / repeats
            n = env.world_size  # bus bandwidth as nccl-tests reports it: algorithm bandwidth x 2(n-1)/n
            result["allreduce_busbw_gbps"] = round(buffer.numel() * 4 / seconds * 2 * (n - 1) / n / 1e9, 2)
        return result
    finally:
        dist.destroy_process_group()


def run_probe(cfg: ProbeConfig, out: Path, env: TaskEnv, element: int | None = None) -> dict[str, Any]:
    """One task of the probe. `element` is the array index when run as a job array."""
    tag = f"element-{element}" if element is not None else f"rank-{env.rank}"
    report: dict[str, Any] = {**dataclasses.asdict(env), "element": element, "hostname": socket.gethostname(),
                              "pid": os.getpid(), "slurmd_nodename": os.environ.get("SLURMD_NODENAME")}
    if env.rank == cfg.fail_rank:
        raise RuntimeError(f"probe.fail_rank={cfg.fail_rank}: failing on purpose")
    if cfg.collective and env.world_size > 1:
        report.update(_all_reduce_ranks(env))
    if cfg.steps:
        counter_path = out / f"counter-{tag}.json"
        counter: dict[str, Any] = (json.loads(counter_path.read_text()) if counter_path.exists()
                                   else {"count": 0, "attempts": []})
        counter["attempts"].append({"restart_count": env.restart_count, "job_id": env.job_id,
                                    "start": counter["count"]})
        publish_json(counter_path, counter)
        while counter["count"] < cfg.steps:
            time.sleep(cfg.step_seconds)
            counter["count"] += 1
            publish_json(counter_path, counter)
        report["count"] = counter["count"]
    publish_json(out / f"env-{tag}.json", report)
    return report
