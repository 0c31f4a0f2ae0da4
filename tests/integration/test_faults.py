"""Fault tests of the cpt stage on the real local Slurm cluster: requeues, preemption, time limits,
a process killed mid-checkpoint, a lost node, and a resume on fewer nodes.

Each test prints one `[fault]` line: optimizer steps lost per interruption, and seconds from process
start to the first step for the resumed attempts against the cold start.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from launcher.cli import main
from launcher.rundir import RunDir
from launcher.status import log_files, refresh
from slurm.executor import TERMINAL_STATES

from .helpers import (
    REPO,
    Reference,
    bitwise_equal,
    losses,
    records,
    run_dir,
    running_in_background,
    train_config,
    wait_finished,
    wait_for,
    wait_for_step,
    weights,
)

pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

FAST = ["cpt.log_every=1", "cpt.eval.every=1000", "cpt.resources.mem_gb=3"]


def interruptions(run_dir: Path) -> list[dict[str, Any]]:
    """Per resumed attempt: the step it resumed from, the steps lost, its time from process start to the
    first step, and the downtime from the last step before the interruption to that first step."""
    found, last_step, last_time = [], 0, 0.0
    for r in records(run_dir, "cpt", "train", "first_step"):
        if r["kind"] == "train":
            last_step, last_time = max(last_step, r["step"]), r["time"]
        elif r["resumed"]:
            resumed_from = r["step"] - 1
            found.append({"resumed_from": resumed_from, "lost": last_step - resumed_from,
                          "resume_s": round(r["seconds_since_process_start"], 1),
                          "downtime_s": round(r["time"] - last_time, 1)})
    return found


def attempt_reached(run_dir: Path, attempt: int, step: int) -> bool:
    """Whether the attempt-th process start has logged a training step >= `step`."""
    starts = 0
    for r in records(run_dir, "cpt", "train", "first_step"):
        starts += r["kind"] == "first_step"
        if starts == attempt and r["kind"] == "train" and r["step"] >= step:
            return True
    return False


def report(name: str, run_dir: Path) -> list[dict[str, Any]]:
    cold = [r["seconds_since_process_start"] for r in records(run_dir, "cpt", "first_step") if not r["resumed"]]
    found = interruptions(run_dir)
    print(f"\n[fault] {name}: cold start {cold[0]:.1f} s to first step; resumes: {found}", flush=True)
    return found


def job_of(run: RunDir) -> str:
    return str(run.read_state()["stages"]["cpt"]["job_ids"][-1])


def task_pids(job_id: str, **env: str) -> list[int]:
    """The job's task processes (python, not srun or the batch shell) whose environment has every `env` item."""
    wanted = {f"SLURM_JOB_ID={job_id}".encode(), *(f"{k}={v}".encode() for k, v in env.items())}
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "comm").read_text().startswith("python") and \
                    wanted <= set((proc / "environ").read_bytes().split(b"\0")):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def sacct_field(job_id: str, field: str) -> str:
    return subprocess.run(["sacct", "-n", "-P", "-X", "-o", field, "-j", job_id], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_scontrol_requeue_at_two_random_steps_is_bitwise_exact(tmp_path: Path, shards: Path,
                                                                 base_model: Path) -> None:
    # micro_batch 32 makes a step take about 0.2 s here: a requeue lands 1-3 steps after it is sent, so the
    # last one (at step <= 26) always arrives well before step 40 ends the run. Two requeues, not three: each
    # costs ~30 s here (Slurm holds a requeued job ~10 s, then the start), and a second one already shows that a
    # resumed attempt resumes again exactly.
    # The uninterrupted reference of the same config (only this test uses it) trains on this machine while
    # the job waits on the scheduler between its attempts; a busy CPU only makes the steps slower.
    overrides = [*FAST, "cpt.steps=40", "cpt.engine.micro_batch=32", "cpt.checkpoint.every_steps=10"]
    assert main(["submit", str(train_config(tmp_path / "requeued", "cpt", shards, base_model)), *overrides]) == 0
    with running_in_background("run", str(train_config(tmp_path / "reference", "cpt", shards, base_model)),
                               *overrides) as reference:
        run = RunDir(run_dir(tmp_path / "requeued", "cpt"))
        job = job_of(run)
        rng = random.Random(os.environ.get("STILLROOM_FAULT_SEED", time.time_ns()))
        at = sorted(rng.sample(range(2, 27, 3), 2))  # spread over the first two thirds of the run
        print(f"\n[fault] requeue at steps {at}")
        for n, step in enumerate(at, 1):
            # Attempt n must be training past `step` (a slow stop could have overshot the planned step).
            wait_for(f"attempt {n} at step {step}", lambda n=n, step=step: attempt_reached(run.path, n, step), 300)
            subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True)
            wait_for(f"stop #{n}", lambda n=n: len(records(run.path, "cpt", "stop")) >= n, timeout=60)
        entry = wait_finished(run, "cpt", timeout=600)
        assert reference.wait(timeout=600) == 0, "the reference run failed"
    assert entry["status"] == "completed" and entry["attempts"] == 3, entry
    found = report("scontrol requeue x2", run.path)
    rank0 = "".join(p.read_text() for p in log_files(run, "cpt", 0))  # what `stillroom logs` prints
    assert rank0.count("resumed from step-") == 2, "one log file spans every attempt of the job"
    progress = refresh(run)["stages"]["cpt"]["progress"]
    assert progress["step"] == progress["total_steps"] == 40 and progress["last_event"] == "checkpoint"
    assert [f["lost"] for f in found] == [0, 0], "a signalled requeue loses no optimizer step"
    ref_dir = run_dir(tmp_path / "reference", "cpt")
    assert losses(run.path, "cpt") == losses(ref_dir, "cpt"), "every step's loss equals the uninterrupted run's"
    assert bitwise_equal(weights(ref_dir, "cpt"), weights(run.path, "cpt")), "final weights are bitwise equal"


def test_preemption_by_the_high_partition_saves_requeues_and_finishes(tmp_path: Path, shards: Path,
                                                                      base_model: Path) -> None:
    config = train_config(tmp_path, "cpt", shards, base_model)
    assert main(["submit", str(config), *FAST, "cpt.steps=40", "cpt.checkpoint.every_steps=0"]) == 0
    run = RunDir(run_dir(tmp_path, "cpt"))
    wait_for_step(run.path, "cpt", 5)
    # Every CPU of both nodes: only preempting the cpt job makes room.
    high = subprocess.run(["sbatch", "--parsable", "-p", "high", "-N", "2", "--ntasks-per-node=1", "-c", "4",
                           "--mem=1G", "-o", str(tmp_path / "high.out"), "--wrap", "sleep 2"],
                          capture_output=True, text=True, check=True).stdout.strip()
    wait_for("the high-priority job to finish", lambda: sacct_field(high, "State") == "COMPLETED", timeout=120)
    entry = wait_finished(run, "cpt", timeout=600)
    assert entry["status"] == "completed" and entry["attempts"] >= 2, entry
    (stop,) = records(run.path, "cpt", "stop")
    assert stop["reason"].startswith("signal"), stop
    assert [f["lost"] for f in report("preemption", run.path)] == [0]
    assert records(run.path, "cpt", "train")[-1]["step"] == 40


@pytest.mark.timeout(1200)
def test_time_limit_shorter_than_training_checkpoints_requeues_and_completes(tmp_path: Path, shards: Path,
                                                                           base_model: Path) -> None:
    # About 105 s of training (idle machine; slower when busy) in 2-minute attempts, each asked to stop 25 s
    # before its limit and spending about 10 s starting, so at most 85 s of training each: at least 2
    # attempts. Slurm sends the signal up to a minute early, so an attempt may train for only half a minute
    # (1-minute attempts spent most of theirs starting: 13 attempts in one CI run); the requeue budget is
    # generous, since the test is about surviving them, not counting them.
    config = train_config(tmp_path, "cpt", shards, base_model)
    assert main(["submit", str(config), *FAST, "cpt.steps=300", "cpt.engine.micro_batch=32",
                 "cpt.checkpoint.every_steps=0", "cpt.resources.time_min=2", "cpt.resources.signal_lead_s=25",
                 "cpt.resources.max_requeues=30"]) == 0
    run = RunDir(run_dir(tmp_path, "cpt"))
    entry = wait_finished(run, "cpt", timeout=900)
    assert entry["status"] == "completed" and entry["attempts"] >= 2, entry
    stops = records(run.path, "cpt", "stop")
    assert stops and all(s["reason"].startswith(("time budget", "signal")) for s in stops), stops
    wait_for("Slurm to record the job COMPLETED", lambda: sacct_field(job_of(run), "State") == "COMPLETED", timeout=60)
    assert all(f["lost"] == 0 for f in report(f"time limit, {len(stops)} stops: {stops}", run.path))
    assert records(run.path, "cpt", "train")[-1]["step"] == 300


def tcp_states(pid: int) -> set[str]:
    """States of the TCP sockets the process holds ("0A": listening, "01": established); empty once it ended."""
    try:
        links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        tables = [Path(f"/proc/{pid}/net/{name}").read_text() for name in ("tcp", "tcp6")]
    except OSError:  # the process ended, or a descriptor closed while being listed
        return set()
    sockets = {link[len("socket:["):-1] for link in links if link.startswith("socket:[")}
    rows = [line.split() for table in tables for line in table.splitlines()[1:]]
    return {row[3] for row in rows if row[9] in sockets}


def test_requeue_signal_during_start_up_leaves_once_set_up_and_the_stage_completes(tmp_path: Path, shards: Path,
                                                                                    base_model: Path) -> None:
    # Slurm may signal an attempt still joining its process group (short limits make it common). Rank 0
    # then used to requeue from inside the rendezvous, and rank 1's "connection closed by peer" marked the
    # stage failed while its next attempt was already queued.
    config = train_config(tmp_path, "cpt", shards, base_model)
    assert main(["submit", str(config), *FAST, "cpt.steps=10"]) == 0
    run = RunDir(run_dir(tmp_path, "cpt"))
    job = job_of(run)
    (rank0,) = wait_for("rank 0's process", lambda: task_pids(job, SLURM_PROCID="0"), timeout=120)
    (rank1,) = wait_for("rank 1's process", lambda: task_pids(job, SLURM_PROCID="1"), timeout=120)
    # Rank 0 serves the rendezvous store and rank 1 is connected to it: both are joining the process group.
    wait_for("both ranks in the rendezvous", lambda: "0A" in tcp_states(rank0) and "01" in tcp_states(rank1),
             timeout=120)
    assert not records(run.path, "cpt", "first_step"), "training began before the signal could be sent"
    subprocess.run(["scancel", "--signal=USR2", job], check=True, capture_output=True)  # what --signal sends
    entry = wait_finished(run, "cpt", timeout=300)
    assert entry["status"] == "completed" and entry["attempts"] == 2, entry
    logs = "".join(p.read_text() for p in log_files(run, "cpt", 0))
    assert "stopping at step 0: signal SIGUSR2; nothing new to save, exit for requeue" in logs
    assert [r["step"] for r in records(run.path, "cpt", "stop")] == [0]
    assert records(run.path, "cpt", "train")[-1]["step"] == 10


def _kill_rank_while_it_writes(checkpoints: Path, rank: int, pid: int, steps: range) -> int:
    """SIGKILL `pid` once DeepSpeed has started writing rank `rank`'s file of a checkpoint and before that rank has
    listed its files (its part of the save unfinished); returns the step whose save it broke. The rank is
    stopped first so that the check and the kill see the same moment; a save it got past is let go on."""
    for step in steps:
        tmp = checkpoints / f"step-{step:010d}.tmp"
        deadline = time.monotonic() + 300
        while not list(tmp.glob(f"*rank_{rank}_*")):
            assert time.monotonic() < deadline, f"no checkpoint write of rank {rank} at step {step} seen"
            time.sleep(0.0005)
        os.kill(pid, signal.SIGSTOP)
        if tmp.is_dir() and not (tmp / f".files-rank{rank:05d}.json").exists():
            os.kill(pid, signal.SIGKILL)
            return step
        os.kill(pid, signal.SIGCONT)
    raise AssertionError(f"rank {rank} finished every save of {steps} before it could be stopped")


def test_a_rank_killed_mid_checkpoint_and_a_flipped_bit_resume_from_the_last_intact_one(
        tmp_path: Path, shards: Path, base_model: Path) -> None:
    config = train_config(tmp_path, "cpt", shards, base_model)
    overrides = [*FAST, "cpt.steps=30", "cpt.checkpoint.every_steps=5"]
    assert main(["submit", str(config), *overrides]) == 0
    run = RunDir(run_dir(tmp_path, "cpt"))
    job, checkpoints = job_of(run), run.path / "cpt" / "checkpoints"
    (rank1,) = wait_for("rank 1's process", lambda: task_pids(job, SLURM_PROCID="1"), timeout=120)
    broken = _kill_rank_while_it_writes(checkpoints, 1, rank1, range(15, 30, 5))
    killed = time.monotonic()
    entry = wait_finished(run, "cpt", timeout=120)
    ended_after = time.monotonic() - killed
    assert entry["status"] == "failed", entry
    assert not (checkpoints / f"step-{broken:010d}").exists(), "a save a rank never finished was published"
    assert ended_after < 60, "rank 0 did not hang waiting for the killed rank"
    previous, intact = f"step-{broken - 5:010d}", broken - 10
    victim = max((checkpoints / previous).rglob("*.pt"), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 3] ^= 0x01  # one bit, same size: only the content hash can tell
    victim.write_bytes(bytes(data))
    assert main(["submit", str(config), *overrides]) == 0  # the same command again: the failed stage resumes
    entry = wait_finished(run, "cpt", timeout=300)
    assert entry["status"] == "completed", entry
    logs = "".join(p.read_text() for p in log_files(run, "cpt", 0))
    assert f"resumed from step-{intact:010d} at step {intact}" in logs
    assert f"checkpoint {previous} is damaged ({victim.name}: content hash" in logs
    assert (checkpoints / f"{previous}.bad" / victim.name).read_bytes() == bytes(data), "kept as it was found"
    found = report(f"rank 1 SIGKILLed mid-checkpoint (job ended {ended_after:.1f} s after the kill), then a bit "
                   "flip", run.path)
    assert [f["resumed_from"] for f in found] == [intact]
    assert records(run.path, "cpt", "train")[-1]["step"] == 30
    assert refresh(run)["stages"]["cpt"]["set_aside"][0]["checkpoint"] == f"{previous}.bad"


def _kill_node(node: str, job: str) -> None:
    """What a crashed node looks like to Slurm: its slurmd, the job's step daemons and tasks on it, gone."""
    tasks = task_pids(job, SLURMD_NODENAME=node)
    assert tasks, f"no task of job {job} on {node}"
    stepds = {int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) for pid in tasks}
    slurmd = int(Path(f"/var/lib/stillroom-slurm/run/slurmd-{node}.pid").read_text())
    for pid in (slurmd, *stepds, *tasks):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_node_lost_during_a_two_node_run_recovers_on_resubmit(tmp_path: Path, shards: Path, base_model: Path) -> None:
    config = train_config(tmp_path, "cpt", shards, base_model)
    overrides = [*FAST, "cpt.steps=40", "cpt.checkpoint.every_steps=5", "cpt.resources.nodes=2",
                 "cpt.resources.tasks_per_node=1"]
    assert main(["submit", str(config), *overrides]) == 0
    run = RunDir(run_dir(tmp_path, "cpt"))
    wait_for_step(run.path, "cpt", 12)
    job = job_of(run)
    _kill_node("node2", job)
    entry = wait_finished(run, "cpt", timeout=300)
    assert entry["status"] == "failed", entry
    subprocess.run(["bash", str(REPO / "slurm" / "local_cluster.sh"), "start"], check=True)  # the node is back
    # A stage marked failed by its surviving rank is resubmitted once the scheduler has ended its job.
    wait_for("Slurm to end the job that lost a node",
             lambda: (sacct_field(job, "State").split() or [""])[0] in TERMINAL_STATES, timeout=300)
    assert main(["submit", str(config), *overrides]) == 0
    entry = wait_finished(run, "cpt", timeout=600)
    assert entry["status"] == "completed", entry
    (found,) = report("node lost", run.path)
    assert found["resumed_from"] >= 10
    assert records(run.path, "cpt", "train")[-1]["step"] == 40


def test_two_node_run_resumed_on_one_node_continues_the_same_data(tmp_path: Path, shards: Path, base_model: Path,
                                                                  cpt_reference: Reference) -> None:
    # Compared against the shared uninterrupted 2-rank run of the same config (test_cpt.py's resume tests use
    # it too): 30 steps, a metrics line each, on one node.
    overrides = list(cpt_reference.overrides)
    config = train_config(tmp_path / "moved", "cpt", shards, base_model)
    two_nodes = ["cpt.resources.nodes=2", "cpt.resources.tasks_per_node=1"]
    assert main(["submit", str(config), *overrides, *two_nodes]) == 0
    run = RunDir(run_dir(tmp_path / "moved", "cpt"))
    wait_for_step(run.path, "cpt", 8)
    assert main(["cancel", str(run.path)]) == 0  # scancel: SIGTERM, the trainer saves at the next step
    wait_for("the stop-checkpoint", lambda: records(run.path, "cpt", "stop"), timeout=60)
    rank1 = "".join(p.read_text() for p in log_files(run, "cpt", 1))
    assert "node=1(2), global_rank=1(2)" in rank1, "rank 1 ran on the second node"
    # One node, one rank: the same global batch is twice the accumulation.
    assert main(["submit", str(config), *overrides, "cpt.resources.nodes=1", "cpt.resources.tasks_per_node=1",
                 "cpt.engine.grad_accum=4"]) == 0
    entry = wait_finished(run, "cpt", timeout=600)
    assert entry["status"] == "completed", entry
    assert (run.path / "cpt" / "export" / "COMPLETE").exists()
    (found,) = report("2 nodes -> 1 node", run.path)
    assert found["lost"] == 0
    ref, got = cpt_reference.losses, losses(run.path, "cpt")
    assert set(got) == set(ref) == set(range(1, 31))
    for step in range(found["resumed_from"] + 1, 31):  # same samples; only the reduction order differs
        assert got[step] == pytest.approx(ref[step], rel=1e-4), step


def test_a_stop_signal_during_the_export_requeues_and_the_stage_completes(tmp_path: Path, shards: Path,
                                                                          base_model: Path) -> None:
    config = train_config(tmp_path, "cpt", shards, base_model)
    assert main(["submit", str(config), *FAST, "cpt.steps=8", "cpt.checkpoint.every_steps=0"]) == 0
    run = RunDir(run_dir(tmp_path, "cpt"))
    export = run.layout.export("cpt")
    wait_for("rank 0 to start writing the export", lambda: next(export.parent.glob(".export.tmp.*"), None),
             timeout=300, every=0.005)
    job = job_of(run)
    (rank0,) = task_pids(job, SLURM_PROCID="0")
    os.kill(rank0, signal.SIGSTOP)  # held inside the export, so that the stop signal surely arrives during it
    try:
        subprocess.run(["scancel", "--signal=USR2", job], check=True)  # what Slurm sends before the time limit
        time.sleep(1)
    finally:
        os.kill(rank0, signal.SIGCONT)
    entry = wait_finished(run, "cpt", timeout=600)
    assert entry["status"] == "completed" and entry["attempts"] >= 2, entry
    (stop,) = records(run.path, "cpt", "stop")
    assert stop["step"] == 8 and "export" in stop["reason"], stop
    assert (export / "COMPLETE").exists() and not list(export.parent.glob(".export.*"))
