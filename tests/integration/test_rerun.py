"""Rerunning the same `stillroom submit` after a failure, on the real local 2-node cluster."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from launcher.rundir import RunDir

from .helpers import PROBE, cli, stage, wait_for, write_config

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]


def _sacct(job_id: str) -> str:
    out = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "State", "-j", job_id], capture_output=True, text=True)
    return out.stdout.strip().split("\n")[0].split(" ")[0] if out.stdout.strip() else ""


def _queued(job_ids: list[str]) -> list[str]:
    """Lines of squeue for these jobs (and their array elements): what is still pending or running."""
    bases = sorted({j.split("_")[0] for j in job_ids})
    out = subprocess.run(["squeue", "-h", "-o", "%i %T %r", "-j", ",".join(bases)], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if line.strip()]


def test_a_job_cancelled_mid_chain_recovers_with_the_same_command(tmp_path: Path, corpora: dict[str, Path],
                                                                  tokenizer_dir: Path) -> None:
    """probe, then shard afterok on it: scancel the running probe and shard's job waits forever
    (DependencyNeverSatisfied). The same submit again cancels that job, resubmits both, and both complete."""
    config = write_config(tmp_path / "chain.toml", {
        "run": {"root": tmp_path / "runs", "name": "chain", "stages": ["probe", "shard"]},
        "resources": {"tasks_per_node": 1, "mem_gb": 1, "time_min": 10},
        "probe": {"collective": False, "steps": 40, "step_seconds": 0.25},
        "shard": {"inputs": [corpora["licenses"]], "tokenizer": tokenizer_dir, "seq_len": 128,
                  "val_fraction": 0.1},
        "shard.reader": {"group_field": "group"},
    })
    cli("submit", str(config))
    run = RunDir(tmp_path / "runs" / "chain")
    wait_for("the probe to count", lambda: list(run.stage_dir("probe").glob("counter-*.json")), 90)
    (probe_job,) = stage(run, "probe")["job_ids"]
    old_shard_jobs = run.read_state()["stages"]["shard"]["job_ids"]
    subprocess.run(["scancel", probe_job], check=True)
    wait_for("the probe job to end cancelled", lambda: _sacct(probe_job) == "CANCELLED", 60)
    wait_for("shard's job to wait forever", lambda: any("DependencyNeverSatisfied" in line
                                                        for line in _queued(old_shard_jobs)), 60)

    cli("submit", str(config))
    for name in ("probe", "shard"):
        entry = wait_for(f"{name} to finish", lambda name=name: (e := stage(run, name)).get("status")
                         in ("completed", "failed", "cancelled") and e, 240)
        assert entry["status"] == "completed", entry
    state = run.read_state()["stages"]
    assert state["shard"]["past_job_ids"] == old_shard_jobs and state["probe"]["past_job_ids"] == [probe_job]
    every_job = [j for e in state.values() for j in e["job_ids"] + e["past_job_ids"]]
    wait_for("every job of the run to leave the queue (none left pending)", lambda: _queued(every_job) == [], 60)
    assert {_sacct(j.split("_")[0]) for j in old_shard_jobs} == {"CANCELLED"}  # a pending array: one record


def test_two_submits_of_one_new_run_at_once_queue_one_set_of_jobs(tmp_path: Path) -> None:
    name = f"twice-{uuid.uuid4().hex[:12]}"  # sacct below looks jobs up by name, over every earlier test session
    # Both load first, then start at the same instant: the two submits' read-check-submit-write overlap.
    start = time.time() + 3
    argv = [sys.executable, "-c", "import sys, time; from launcher.cli import main; "
            "time.sleep(max(0.0, float(sys.argv[1]) - time.time())); sys.exit(main(sys.argv[2:]))", str(start),
            "submit", str(PROBE), f"run.root={tmp_path}", f"run.name={name}", "resources.tasks_per_node=1",
            "probe.collective=false", "probe.steps=0"]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    def jobs_named() -> list[str]:
        return subprocess.run(["sacct", "-n", "-P", "-X", "-S", "now-1hours", "-o", "JobID", "--name",
                               f"{name}.probe"], capture_output=True, text=True, check=True).stdout.split()

    wait_for("the job to reach accounting", jobs_named, 30)
    time.sleep(2)  # a second job, had one been submitted, would have reached it by now too
    sacct = jobs_named()
    assert len(sacct) == 1, (sacct, outputs)
    assert sum("already queued or running" in out for out in outputs) == 1
    assert RunDir(tmp_path / name).read_state()["stages"]["probe"]["job_ids"] == sacct
