"""Rerunning the same `stillroom submit` after a failure, on the real local 2-node cluster."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from launcher.rundir import RunDir

from .helpers import PROBE, cli, records, run_dir, stage, train_config, wait_for, wait_for_step

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]


def _sacct(job_id: str) -> str:
    out = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "State", "-j", job_id], capture_output=True, text=True)
    return out.stdout.strip().split("\n")[0].split(" ")[0] if out.stdout.strip() else ""


def _queued(job_ids: list[str]) -> list[str]:
    """Lines of squeue for these jobs (and their array elements): what is still pending or running."""
    bases = sorted({j.split("_")[0] for j in job_ids})
    out = subprocess.run(["squeue", "-h", "-o", "%i %T %r", "-j", ",".join(bases)], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if line.strip()]


def test_a_job_cancelled_mid_chain_recovers_with_the_same_command(tmp_path: Path, shards: Path,
                                                                  base_model: Path) -> None:
    """cpt, then report afterok on it: scancel the running cpt job and report's job waits forever
    (DependencyNeverSatisfied). The same submit again cancels that job, resubmits both, and both complete."""
    config = train_config(tmp_path, "cpt", shards, base_model)
    argv = ["submit", str(config), 'run.stages=["cpt","report"]', "cpt.steps=40", "cpt.log_every=1",
            "cpt.eval.every=1000", "cpt.checkpoint.every_steps=5", "report.max_rows=8", "report.batch=4"]
    cli(*argv)
    run = RunDir(run_dir(tmp_path, "cpt"))
    wait_for_step(run.path, "cpt", 6)
    (cpt_job,) = stage(run, "cpt")["job_ids"]
    (report_job,) = run.read_state()["stages"]["report"]["job_ids"]
    subprocess.run(["scancel", cpt_job], check=True)
    wait_for("the cpt job to end cancelled", lambda: _sacct(cpt_job) == "CANCELLED", 90)
    wait_for("report's job to wait forever", lambda: any("DependencyNeverSatisfied" in line
                                                         for line in _queued([report_job])), 60)

    cli(*argv)
    for name in ("cpt", "report"):
        entry = wait_for(f"{name} to finish", lambda name=name: (e := stage(run, name)).get("status")
                         in ("completed", "failed", "cancelled") and e, 300)
        assert entry["status"] == "completed", entry
    state = run.read_state()["stages"]
    assert state["cpt"]["past_job_ids"] == [cpt_job] and state["report"]["past_job_ids"] == [report_job]
    every_job = [j for e in state.values() for j in e["job_ids"] + e["past_job_ids"]]
    wait_for("every job of the run to leave the queue (none left pending)", lambda: _queued(every_job) == [], 60)
    assert _sacct(report_job) == "CANCELLED"
    assert records(run.path, "cpt", "train")[-1]["step"] == 40 and run.layout.export("cpt").is_dir()


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
