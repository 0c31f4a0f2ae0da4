from __future__ import annotations

import pytest

from slurm.taskenv import expand_hostlist, port_for_job, task_env


@pytest.mark.parametrize(("text", "hosts"), [
    ("node1", ["node1"]),
    ("node[1-2]", ["node1", "node2"]),
    ("gpu[01-03,7],login", ["gpu01", "gpu02", "gpu03", "gpu7", "login"]),
    ("a[8-10]b,c", ["a8b", "a9b", "a10b", "c"]),
    ("x-[001-002]", ["x-001", "x-002"]),
])
def test_expand_hostlist(text: str, hosts: list[str]) -> None:
    assert expand_hostlist(text) == hosts


def test_bad_hostlist_range() -> None:
    with pytest.raises(ValueError, match="bad range"):
        expand_hostlist("n[5-2]")


def test_slurm_environment() -> None:
    env = task_env({"SLURM_JOB_ID": "4711", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4",
                    "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "node[1-2]",
                    "SLURM_RESTART_COUNT": "2", "SLURM_JOB_END_TIME": "1800000000"})
    assert (env.launcher, env.rank, env.local_rank, env.world_size, env.node_rank) == ("slurm", 3, 1, 4, 1)
    assert env.nodes == ("node1", "node2") and env.master_addr == "node1"
    assert env.master_port == port_for_job("4711") and env.restart_count == 2 and env.end_time == 1.8e9
    assert env.torch_env()["LOCAL_WORLD_SIZE"] == "2"


def test_torchrun_variables_win_inside_an_allocation() -> None:
    env = task_env({"SLURM_JOB_ID": "1", "SLURM_PROCID": "0", "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                    "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "h", "MASTER_PORT": "1234"})
    assert (env.launcher, env.rank, env.node_rank, env.num_nodes, env.master_port) == ("torchrun", 5, 1, 2, 1234)


def test_local_and_single() -> None:
    local = task_env({"SUBMITIT_LOCAL_JOB_ID": "99", "SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1",
                      "SUBMITIT_LOCAL_NTASKS": "2"})
    assert (local.launcher, local.rank, local.world_size, local.master_addr) == ("local", 1, 2, "127.0.0.1")
    single = task_env({})
    assert (single.launcher, single.rank, single.world_size) == ("single", 0, 1)


def test_ports_differ_between_jobs_and_stay_in_range() -> None:
    ports = {port_for_job(str(j)) for j in range(100, 200)}
    assert len(ports) == 100 and all(20000 <= p < 30000 for p in ports)
