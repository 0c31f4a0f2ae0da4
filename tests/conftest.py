"""Shared fixtures. Slurm tests use the real local cluster (slurm/local_cluster.sh), never a mock."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that the OS has just handed out (bound to port 0): the one way tests pick a
    rendezvous port (`from tests.conftest import free_port`), never a fixed number."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def one_rank_group(port: int) -> Iterator[None]:
    """A gloo process group of this process alone, set up as the trainer's task environment would (rank 0 of 1,
    DeepSpeed on CPU): for a spawned test process that builds a real engine. Torn down on the way out."""
    import torch.distributed as dist

    os.environ.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      DS_ACCELERATOR="cpu")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=timedelta(seconds=60))
    try:
        yield
    finally:
        dist.destroy_process_group()


def _cluster_problem() -> str | None:
    """None when both local nodes answer, else one line saying why the cluster is not usable."""
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=20)
    except FileNotFoundError:
        return "Slurm is not installed (no sinfo); run `make test` as root or `sudo slurm/local_cluster.sh start`"
    except subprocess.TimeoutExpired:
        return "slurmctld does not answer (sinfo timed out); see `slurm/local_cluster.sh status`"
    if out.returncode != 0:
        return f"slurmctld does not answer: {out.stderr.strip() or out.stdout.strip()}"
    states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
    usable = {n for n, s in states.items() if s.rstrip("*~#") in {"idle", "mix", "alloc", "comp"}}
    if not {"node1", "node2"} <= usable:
        return f"local cluster nodes node1/node2 are not up (sinfo: {states}); run slurm/local_cluster.sh start"
    return None


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    problem = _cluster_problem()
    if problem is None:
        return
    if os.environ.get("STILLROOM_REQUIRE_SLURM") == "1":
        pytest.fail(f"STILLROOM_REQUIRE_SLURM=1 but the local Slurm cluster is unusable: {problem}", pytrace=False)
    pytest.skip(f"local Slurm cluster unavailable: {problem}")


@pytest.fixture
def run_root(tmp_path: Path) -> Path:
    """Where test runs put their run directories (a fresh folder per test)."""
    root = tmp_path / "runs"
    root.mkdir()
    return root
