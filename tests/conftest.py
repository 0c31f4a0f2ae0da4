"""Shared fixtures. Slurm tests use the real local cluster (slurm/local_cluster.sh), never a mock."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that the OS has just handed out (bound to port 0): the one way tests pick a
    rendezvous port (`from tests.conftest import free_port`), never a fixed number."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
