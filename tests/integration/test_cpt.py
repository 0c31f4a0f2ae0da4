"""The cpt stage with real DeepSpeed engines in 2 processes (gloo), on a tiny Llama and real shards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from launcher.cli import main
from launcher.run_config import load_run_config
from launcher.rundir import RunDir
from launcher.status import log_files
from training.stop import REQUEUE_EXIT_CODE

pytestmark = pytest.mark.slow


def cpt_config(folder: Path, shards: Path, model: Path, *lines: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cpt.toml"
    path.write_text("\n".join([
        "[run]", f"root = {json.dumps(str(folder / 'runs'))}", 'name = "cpt"', 'stages = ["cpt"]',
        "[cpt]", "steps = 12", f"domain_val = {json.dumps(str(shards))}", f"general_val = {json.dumps(str(shards))}",
        "[cpt.model]", f"path = {json.dumps(str(model))}", "dropout = 0.0",
        "[cpt.data]", f"sources = {json.dumps([str(shards)])}",
        "[cpt.optim]", "lr = 1e-3", "warmup_steps = 2",
        "[cpt.engine]", "micro_batch = 2", "grad_accum = 2",
        "[cpt.eval]", "every = 6", "batches = 2",
        "[cpt.checkpoint]", "every_steps = 4",
        "[cpt.resources]", "tasks_per_node = 2", "time_min = 20", *lines, ""]))
    return path


def metrics(run_dir: Path, kind: str) -> list[dict]:  # type: ignore[type-arg]
    lines = (run_dir / "cpt" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def weights(run_dir: Path) -> dict:  # type: ignore[type-arg]
    return load_file(str(run_dir / "cpt" / "export" / "model.safetensors"))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_train_and_export(tmp_path: Path, shards: Path, base_model: Path, stage: int) -> None:
    config = cpt_config(tmp_path, shards, base_model)
    assert main(["run", str(config), f"cpt.engine.zero_stage={stage}"]) == 0
    run_dir = tmp_path / "runs" / "cpt"
    train = metrics(run_dir, "train")
    assert train[-1]["step"] == 12 and all(r["loss"] > 0 for r in train)
    evals = metrics(run_dir, "eval")
    assert evals[0].get("base") and evals[-1]["domain_loss"] < evals[0]["domain_loss"], "training lowers the loss"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run_dir / "cpt" / "export")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "cpt" / "export")
    out = model.generate(**tokenizer("The licensee", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert out.shape[1] > 2
    provenance = json.loads((run_dir / "cpt" / "export" / "provenance.json").read_text())
    assert provenance["steps"] == 12 and provenance["base_model"] == str(base_model)


def _run_trainer(run_dir: Path, world: int, port: int, stage: str = "cpt") -> list[subprocess.Popen[bytes]]:
    """The stage's train step in `world` processes started torchrun-style (so signals reach them directly)."""
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-c", "import sys; from launcher.stages import StageTask; "
                                       "StageTask(sys.argv[2], 'train', sys.argv[1])()", str(run_dir), stage],
                                      env=env))
    return procs


def wait_for_step(log: Path, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not (log.exists() and f'"kind": "train", "step": {step},' in log.read_text()):
        assert time.monotonic() < deadline, f"no step {step} in {log} after {timeout} s"
        time.sleep(0.05)


def test_sigusr2_checkpoints_and_resume_is_bitwise_exact(tmp_path: Path, shards: Path, base_model: Path) -> None:
    reference = cpt_config(tmp_path / "reference", shards, base_model)
    assert main(["run", str(reference), "cpt.steps=30", "cpt.eval.every=10", "cpt.log_every=1"]) == 0
    config = cpt_config(tmp_path / "interrupted", shards, base_model)
    cfg = load_run_config(config, ["cpt.steps=30", "cpt.eval.every=10", "cpt.log_every=1"])
    run = RunDir.create(cfg)
    run.update_stage("cpt", status="submitted", tasks=2, executor="local")
    procs = _run_trainer(run.path, 2, 29611)
    log = run.path / "cpt" / "metrics.jsonl"
    wait_for_step(log, 10)
    procs[1].send_signal(signal.SIGUSR2)  # one rank is enough: the ranks agree at the next step boundary
    codes = [p.wait(timeout=120) for p in procs]
    assert codes == [REQUEUE_EXIT_CODE, REQUEUE_EXIT_CODE]
    stop = [r for r in map(json.loads, log.read_text().splitlines()) if r["kind"] in ("stop", "checkpoint")]
    assert stop[-1]["kind"] == "stop" and stop[-2]["kind"] == "checkpoint" and stop[-2]["step"] == stop[-1]["step"]
    stopped_at = stop[-1]["step"]
    assert 10 <= stopped_at < 30
    procs = _run_trainer(run.path, 2, 29612)
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    ref_dir, run_dir = tmp_path / "reference" / "runs" / "cpt", run.path
    ref_losses = {r["step"]: r["loss"] for r in metrics(ref_dir, "train")}
    got_losses = {r["step"]: r["loss"] for r in metrics(run_dir, "train")}
    assert len(ref_losses) == 30 and got_losses == ref_losses, "every step's loss equals the uninterrupted run's"
    a, b = weights(ref_dir), weights(run_dir)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), "final weights are bitwise equal"


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path: Path, shards: Path, base_model: Path) -> None:
    config = cpt_config(tmp_path, shards, base_model)
    assert main(["run", str(config), "cpt.steps=8"]) == 0
    run_dir = tmp_path / "runs" / "cpt"
    checkpoints = sorted((run_dir / "cpt" / "checkpoints").glob("step-*"))
    assert [p.name for p in checkpoints] == ["step-0000000004", "step-0000000008"]
    victim = next(p for p in (checkpoints[-1]).rglob("*.pt"))
    victim.write_bytes(victim.read_bytes()[:100])  # truncated: its size no longer matches COMPLETE
    (run_dir / "cpt" / "export" / "COMPLETE").unlink()
    state = json.loads((run_dir / "state.json").read_text())
    state["stages"]["cpt"]["status"] = "failed"
    (run_dir / "state.json").write_text(json.dumps(state))
    with pytest.warns(UserWarning, match="step-0000000008"):
        from training.checkpoint import Checkpointer

        assert Checkpointer(run_dir / "cpt" / "checkpoints", 2, 0, 1, lambda: None).latest_valid() == checkpoints[0]
    assert main(["run", str(config), "cpt.steps=8"]) == 0
    logs = "".join(p.read_text() for p in log_files(RunDir(run_dir), "cpt", 0))
    assert "resumed from step-0000000004 at step 4" in logs


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_cpt_across_two_slurm_nodes(tmp_path: Path, shards: Path, base_model: Path) -> None:
    from .helpers import wait_finished

    config = cpt_config(tmp_path, shards, base_model)
    assert main(["submit", str(config), "cpt.resources.nodes=2", "cpt.resources.tasks_per_node=1", "cpt.steps=6",
                 "cpt.resources.mem_gb=3"]) == 0
    run = RunDir(tmp_path / "runs" / "cpt")
    entry = wait_finished(run, "cpt", timeout=600)
    assert entry["status"] == "completed", entry
    assert sorted(entry["tasks_done"]) == ["train/rank-0", "train/rank-1"]
    rank1 = "".join(p.read_text() for p in log_files(run, "cpt", 1))
    assert "node=1(2), global_rank=1(2)" in rank1, "rank 1 ran on the second node"
    assert metrics(run.path, "train")[-1]["step"] == 6
    assert (run.path / "cpt" / "export" / "COMPLETE").exists()


def test_two_rank_run_resumed_on_one_rank_continues_the_same_data(tmp_path: Path, shards: Path,
                                                                  base_model: Path) -> None:
    overrides = ["cpt.steps=16", "cpt.eval.every=100", "cpt.log_every=1", "cpt.checkpoint.every_steps=0"]
    reference = cpt_config(tmp_path / "reference", shards, base_model)
    assert main(["run", str(reference), *overrides]) == 0
    config = cpt_config(tmp_path / "elastic", shards, base_model)
    run = RunDir.create(load_run_config(config, overrides))
    run.update_stage("cpt", status="submitted", tasks=2, executor="local")
    procs = _run_trainer(run.path, 2, 29621)
    log = run.path / "cpt" / "metrics.jsonl"
    wait_for_step(log, 6)
    for p in procs:
        p.send_signal(signal.SIGUSR2)
    assert [p.wait(timeout=120) for p in procs] == [REQUEUE_EXIT_CODE] * 2
    stopped = [r for r in map(json.loads, log.read_text().splitlines()) if r["kind"] == "stop"][-1]["step"]
    # Same global batch on one rank: twice the accumulation. The config change is allowed on resume.
    one_rank = load_run_config(config, [*overrides, "cpt.engine.grad_accum=4", "cpt.resources.tasks_per_node=1"])
    (run.path / "config.toml").unlink()
    RunDir.create(one_rank)
    (proc,) = _run_trainer(run.path, 1, 29622)
    assert proc.wait(timeout=300) == 0
    ref = {r["step"]: r["loss"] for r in metrics(tmp_path / "reference" / "runs" / "cpt", "train")}
    got = {r["step"]: r["loss"] for r in metrics(run.path, "train")}
    assert stopped < 16 and set(got) == set(ref)
    for step in range(stopped + 1, 17):  # after the resume: same samples, only the reduction order differs
        assert got[step] == pytest.approx(ref[step], rel=1e-4), step
