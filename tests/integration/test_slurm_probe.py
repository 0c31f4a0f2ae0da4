"""The Slurm layer end to end on the real local 2-node cluster (slurm/local_cluster.sh)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from launcher.pipeline import job_spec
from launcher.run_config import load_run_config
from launcher.rundir import RunDir
from launcher.stages import STAGES
from launcher.status import log_files
from slurm.executor import SlurmExecutor

from .helpers import PROBE, cli, reports, stage, submit, wait_finished, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]


def test_two_nodes_two_tasks_share_one_rendezvous(run_root: Path) -> None:
    run = submit(run_root, "resources.nodes=2", "resources.tasks_per_node=2", "probe.steps=0")
    entry = wait_finished(run)
    assert entry["status"] == "completed", entry
    envs = reports(run)
    assert len(envs) == 4
    assert {e["world_size"] for e in envs} == {4}
    assert sorted(e["rank"] for e in envs) == [0, 1, 2, 3]
    assert {e["node_rank"] for e in envs} == {0, 1}
    assert {e["slurmd_nodename"] for e in envs} == {"node1", "node2"}
    assert {e["master_addr"] for e in envs} == {"node1"} and len({e["master_port"] for e in envs}) == 1
    assert {e["rank_sum"] for e in envs} == {0 + 1 + 2 + 3}  # a gloo all-reduce across both nodes
    assert log_files(run, "probe", 3), "stillroom logs finds rank 3's log"


def test_job_array_runs_every_element(run_root: Path) -> None:
    run = submit(run_root, "probe.array_size=3", "resources.tasks_per_node=1", "probe.collective=false",
                 "probe.steps=0")
    entry = wait_finished(run)
    assert entry["status"] == "completed", entry
    assert sorted(e["element"] for e in reports(run)) == [0, 1, 2]
    assert len(entry["job_ids"]) == 3 and len({j.split("_")[0] for j in entry["job_ids"]}) == 1


def _running(run_root: Path, *overrides: str):  # type: ignore[no-untyped-def]
    run = submit(run_root, "resources.tasks_per_node=1", "probe.collective=false", "probe.steps=400",
                 "probe.step_seconds=0.5", *overrides)
    wait_for("the probe to count", lambda: list(run.stage_dir("probe").glob("counter-*.json")), 90)
    return run


def test_cancel_leaves_the_job_cancelled_in_status(run_root: Path) -> None:
    run = _running(run_root)
    (job_id,) = stage(run)["job_ids"]
    cli("cancel", str(run.path))
    wait_for("sacct to show CANCELLED", lambda: _sacct(job_id, "State") == "CANCELLED", 60)
    assert stage(run)["status"] == "cancelled"


def test_job_cancelled_outside_stillroom_shows_cancelled(run_root: Path) -> None:
    run = _running(run_root)
    (job_id,) = stage(run)["job_ids"]
    subprocess.run(["scancel", job_id], check=True)
    entry = wait_for("status to notice the cancellation", lambda: (e := stage(run))["status"] == "cancelled" and e)
    assert "CANCELLED" in entry["error"]


def _sacct(job_id: str, field: str) -> str:
    out = subprocess.run(["sacct", "-n", "-P", "-X", "-o", field, "-j", job_id], capture_output=True, text=True)
    return out.stdout.split()[0] if out.stdout.split() else ""


def test_requeued_probe_resumes_its_counter(run_root: Path) -> None:
    run = submit(run_root, "resources.tasks_per_node=1", "probe.collective=false", "probe.steps=16",
                 "probe.step_seconds=0.5")
    counter = run.stage_dir("probe") / "counter-rank-0.json"
    wait_for("3 counted steps", lambda: counter.exists() and json.loads(counter.read_text())["count"] >= 3, 90)
    (job_id,) = stage(run)["job_ids"]
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    entry = wait_finished(run, timeout=240)
    assert entry["status"] == "completed", entry
    state = json.loads(counter.read_text())
    assert state["count"] == 16
    first, second = state["attempts"]
    assert (first["restart_count"], first["start"]) == (0, 0)
    assert second["restart_count"] == 1 and second["start"] >= 3, "the requeued attempt resumed, not restarted"
    assert second["job_id"] == job_id and entry["attempts"] == 2


def test_hostile_run_directory_path_survives_sbatch(tmp_path: Path) -> None:
    root = tmp_path / "my run's \"dir\" $HOME `id`"
    root.mkdir()
    run = submit(root, "resources.tasks_per_node=1", "probe.collective=false", "probe.steps=0")
    assert wait_finished(run)["status"] == "completed"
    assert reports(run)[0]["world_size"] == 1


def test_afterok_dependency_orders_jobs(run_root: Path) -> None:
    (run_root / "a").mkdir()
    first = submit(run_root / "a", "resources.tasks_per_node=1", "probe.collective=false", "probe.steps=6",
                   "probe.step_seconds=0.5")
    (first_id,) = stage(first)["job_ids"]
    cfg = load_run_config(PROBE, [f"run.root={run_root / 'b'}", "resources.tasks_per_node=1",
                                  "probe.collective=false", "probe.steps=0"])
    second = RunDir.create(cfg)
    (step,) = STAGES["probe"].steps
    (job,) = SlurmExecutor().submit(job_spec(cfg, second, "probe", step, after=(first_id,)))
    second.update_stage("probe", status="submitted", executor="slurm", job_ids=[job.job_id], tasks=1)
    reason = subprocess.run(["squeue", "-h", "-j", job.job_id, "-o", "%r"], capture_output=True, text=True).stdout
    assert reason.strip() == "Dependency"
    assert wait_finished(second)["status"] == "completed"
    assert _sacct(job.job_id, "Start") >= _sacct(first_id, "End")


def test_resubmitting_a_running_stage_submits_nothing_and_a_cancelled_one_again(run_root: Path) -> None:
    run = _running(run_root)
    (job_id,) = stage(run)["job_ids"]
    overrides = ("resources.tasks_per_node=1", "probe.collective=false", "probe.steps=400", "probe.step_seconds=0.5")
    submit(run_root, *overrides)  # the same command again while the job runs
    assert stage(run)["job_ids"] == [job_id], "a running job is not submitted twice"
    names = subprocess.run(["squeue", "-h", "-o", "%i", "-n", f"{run.read_state()['run']}.probe"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert names == [job_id], names
    cli("cancel", str(run.path))
    wait_for("sacct to show CANCELLED", lambda: _sacct(job_id, "State") == "CANCELLED", 60)
    submit(run_root, *overrides)  # cancelled: submitted again
    (again,) = stage(run)["job_ids"]
    assert again != job_id and stage(run)["status"] in ("submitted", "running")
    cli("cancel", str(run.path))
