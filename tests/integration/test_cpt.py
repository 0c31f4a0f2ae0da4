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


def _damage(checkpoint: Path, how: str) -> None:
    """Same-size damage to the checkpoint's largest file, which its listed sizes cannot see."""
    victim = max(checkpoint.rglob("*.pt"), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    if how == "bit flip":
        data[len(data) // 2] ^= 0x20
    elif how == "zeroed block":
        data[len(data) // 2: len(data) // 2 + 4096] = bytes(4096)
    else:  # "unloadable, hashes unknown": a checkpoint of before content hashes with its zip directory zeroed
        data[-4096:] = bytes(4096)
        info = json.loads((checkpoint / "COMPLETE").read_text())
        info["files"] = {rel: entry["bytes"] for rel, entry in info["files"].items()}
        (checkpoint / "COMPLETE").write_text(json.dumps({**info, "version": 1}))
    victim.write_bytes(bytes(data))


def test_a_damaged_newest_checkpoint_is_set_aside_and_the_rerun_resumes_from_the_previous(
        tmp_path: Path, shards: Path, base_model: Path) -> None:
    config = train_config(tmp_path, "cpt", shards, base_model)
    assert main(["run", str(config), "cpt.steps=8"]) == 0
    out = run_dir(tmp_path, "cpt")
    checkpoints = out / "cpt" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-0000000004", "step-0000000008"]
    for attempt, how in enumerate(("bit flip", "zeroed block", "unloadable, hashes unknown"), start=1):
        _damage(checkpoints / "step-0000000008", how)
        (out / "cpt" / "export" / "COMPLETE").unlink()  # so that the rerun has the stage to do again
        state = json.loads((out / "state.json").read_text())
        state["stages"]["cpt"]["status"] = "failed"
        (out / "state.json").write_text(json.dumps(state))
        assert main(["run", str(config), "cpt.steps=8"]) == 0, how
        first = records(out, "cpt", "first_step")
        assert len(first) == attempt + 1 and first[-1]["resumed"] and first[-1]["step"] == 5, (how, first)
        bad = sorted(p.name for p in checkpoints.glob("step-0000000008.bad*"))
        assert len(bad) == attempt, (how, bad)  # each damaged one kept, none deleted
        why = json.loads((checkpoints / bad[-1] / "SET_ASIDE.json").read_text())["problems"]
        expected = "failed: " if how.startswith("unloadable") else "content hash"
        assert any(expected in p for p in why), (how, why)
        assert (checkpoints / "step-0000000008" / "COMPLETE").exists(), "the rerun saved step 8 anew"
    logs = "".join(p.read_text() for p in log_files(RunDir(out), "cpt", 0))  # the last attempt's
    assert "predates content hashes" in logs and "resumed from step-0000000004 at step 4" in logs


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
    wait_for_step(run.path, "cpt", stopped + 6)
    proc.send_signal(signal.SIGUSR2)
    assert proc.wait(timeout=120) == REQUEUE_EXIT_CODE
    again = records(run.path, "cpt", "stop")[-1]["step"]
    # And back on 2 ranks: the 1-rank checkpoint goes through the universal format, converted by rank 0 while
    # rank 1 waits for it on the filesystem. This leg exports the best checkpoint: one saved since the resume, at
    # this rank count, which the engine must read natively although it was set up to read a universal one.
    (run.path / "config.toml").unlink()
    RunDir.create(load_run_config(config, [*overrides, "cpt.export=best"]))
    procs = run_trainer(run.path, 2)
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    best = json.loads((run.path / "cpt" / "export" / "provenance.json").read_text())["weights"]
    assert best.startswith("the best checkpoint, step-") and int(best.rsplit("-", 1)[1]) > again, best
    first = records(run.path, "cpt", "first_step")[-1]
    assert (first["step"], first["world"], first["resumed"]) == (again + 1, 2, True)
    converted = {p.name for p in (run.path / "cpt" / "universal").glob("step-*")}
    assert converted <= {p.name for p in (run.path / "cpt" / "checkpoints").glob("step-*")}, \
        "a conversion is pruned with its checkpoint"
    ref, got = cpt_reference.losses, losses(run.path, "cpt")
    assert stopped < again < 30 and set(got) == set(ref)
    for step in range(stopped + 1, 31):  # after the resumes: same samples, only the reduction order differs
        assert got[step] == pytest.approx(ref[step], rel=1e-4), step
