"""The cpt stage with real DeepSpeed engines in 2 processes (gloo), on a tiny Llama and real shards."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from launcher.cli import main
from launcher.run_config import load_run_config
from launcher.rundir import RunDir
from launcher.status import log_files
from training.stop import REQUEUE_EXIT_CODE

from .helpers import (
    CPT_REFERENCE,
    Reference,
    bitwise_equal,
    losses,
    records,
    run_dir,
    run_trainer,
    train_config,
    wait_finished,
    wait_for_step,
    weights,
)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_train_and_export(tmp_path: Path, shards: Path, base_model: Path, stage: int,
                                      request: pytest.FixtureRequest) -> None:
    if stage == 2:  # ZeRO-2 is the default: the shared reference run is this very run
        reference: Reference = request.getfixturevalue("cpt_reference")
        assert reference.config.engine.zero_stage == 2
        out = reference.run_dir
    else:
        config = train_config(tmp_path, "cpt", shards, base_model)
        assert main(["run", str(config), *CPT_REFERENCE, f"cpt.engine.zero_stage={stage}"]) == 0
        out = run_dir(tmp_path, "cpt")
    train = records(out, "cpt", "train")
    assert train[-1]["step"] == 30 and all(r["loss"] > 0 for r in train)
    evals = records(out, "cpt", "eval")
    assert evals[0].get("base") and evals[-1]["domain_loss"] < evals[0]["domain_loss"], "training lowers the loss"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "cpt" / "export")
    tokenizer = AutoTokenizer.from_pretrained(out / "cpt" / "export")
    generated = model.generate(**tokenizer("The licensee", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > 2
    provenance = json.loads((out / "cpt" / "export" / "provenance.json").read_text())
    assert provenance["steps"] == 30 and provenance["base_model"] == str(base_model)


def test_sigusr2_checkpoints_and_resume_is_bitwise_exact(tmp_path: Path, shards: Path, base_model: Path,
                                                         cpt_reference: Reference) -> None:
    # The reference: the same config (steps, seeds, 2 ranks, ZeRO-2, log_every, eval.every), uninterrupted.
    config = train_config(tmp_path / "interrupted", "cpt", shards, base_model)
    assert cpt_reference.same_training(config, cpt_reference.overrides)
    run = RunDir.create(load_run_config(config, list(cpt_reference.overrides)))
    run.update_stage("cpt", status="submitted", tasks=2, executor="local")
    procs = run_trainer(run.path, 2)
    wait_for_step(run.path, "cpt", 10)
    procs[1].send_signal(signal.SIGUSR2)  # one rank is enough: the ranks agree at the next step boundary
    codes = [p.wait(timeout=120) for p in procs]
    assert codes == [REQUEUE_EXIT_CODE, REQUEUE_EXIT_CODE]
    stop = records(run.path, "cpt", "stop", "checkpoint")
    assert stop[-1]["kind"] == "stop" and stop[-2]["kind"] == "checkpoint" and stop[-2]["step"] == stop[-1]["step"]
    stopped_at = stop[-1]["step"]
    assert 10 <= stopped_at < 30
    procs = run_trainer(run.path, 2)
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    ref_losses = cpt_reference.losses
    assert len(ref_losses) == 30 and losses(run.path, "cpt") == ref_losses, \
        "every step's loss equals the uninterrupted run's"
    assert bitwise_equal(cpt_reference.weights, weights(run.path, "cpt")), "final weights are bitwise equal"


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path: Path, shards: Path, base_model: Path) -> None:
    config = train_config(tmp_path, "cpt", shards, base_model)
    assert main(["run", str(config), "cpt.steps=8"]) == 0
    out = run_dir(tmp_path, "cpt")
    checkpoints = sorted((out / "cpt" / "checkpoints").glob("step-*"))
    assert [p.name for p in checkpoints] == ["step-0000000004", "step-0000000008"]
    victim = next(p for p in (checkpoints[-1]).rglob("*.pt"))
    victim.write_bytes(victim.read_bytes()[:100])  # truncated: its size no longer matches COMPLETE
    (out / "cpt" / "export" / "COMPLETE").unlink()
    state = json.loads((out / "state.json").read_text())
    state["stages"]["cpt"]["status"] = "failed"
    (out / "state.json").write_text(json.dumps(state))
    with pytest.warns(UserWarning, match="step-0000000008"):
        from training.checkpoint import Checkpointer

        assert Checkpointer(out / "cpt" / "checkpoints", 2, 0, 1, lambda: None).latest_valid() == checkpoints[0]
    assert main(["run", str(config), "cpt.steps=8"]) == 0
    logs = "".join(p.read_text() for p in log_files(RunDir(out), "cpt", 0))
    assert "resumed from step-0000000004 at step 4" in logs


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_cpt_across_two_slurm_nodes(tmp_path: Path, shards: Path, base_model: Path) -> None:
    config = train_config(tmp_path, "cpt", shards, base_model)
    assert main(["submit", str(config), "cpt.resources.nodes=2", "cpt.resources.tasks_per_node=1", "cpt.steps=6",
                 "cpt.resources.mem_gb=3"]) == 0
    run = RunDir(run_dir(tmp_path, "cpt"))
    entry = wait_finished(run, "cpt", timeout=600)
    assert entry["status"] == "completed", entry
    assert sorted(entry["tasks_done"]) == ["train/rank-0", "train/rank-1"]
    rank1 = "".join(p.read_text() for p in log_files(run, "cpt", 1))
    assert "node=1(2), global_rank=1(2)" in rank1, "rank 1 ran on the second node"
    assert records(run.path, "cpt", "train")[-1]["step"] == 6
    assert (run.path / "cpt" / "export" / "COMPLETE").exists()


def test_two_rank_run_resumed_on_one_rank_continues_the_same_data(tmp_path: Path, shards: Path, base_model: Path,
                                                                  cpt_reference: Reference) -> None:
    overrides = list(cpt_reference.overrides)
    config = train_config(tmp_path / "elastic", "cpt", shards, base_model)
    assert cpt_reference.same_training(config, overrides), "the first half trains as the reference did"
    run = RunDir.create(load_run_config(config, overrides))
    run.update_stage("cpt", status="submitted", tasks=2, executor="local")
    procs = run_trainer(run.path, 2)
    wait_for_step(run.path, "cpt", 6)
    for p in procs:
        p.send_signal(signal.SIGUSR2)
    assert [p.wait(timeout=120) for p in procs] == [REQUEUE_EXIT_CODE] * 2
    stopped = records(run.path, "cpt", "stop")[-1]["step"]
    # Same global batch on one rank: twice the accumulation. The config change is allowed on resume.
    one_rank = load_run_config(config, [*overrides, "cpt.engine.grad_accum=4", "cpt.resources.tasks_per_node=1"])
    (run.path / "config.toml").unlink()
    RunDir.create(one_rank)
    (proc,) = run_trainer(run.path, 1)
    assert proc.wait(timeout=300) == 0
    ref, got = cpt_reference.losses, losses(run.path, "cpt")
    assert stopped < 30 and set(got) == set(ref)
    for step in range(stopped + 1, 31):  # after the resume: same samples, only the reduction order differs
        assert got[step] == pytest.approx(ref[step], rel=1e-4), step
