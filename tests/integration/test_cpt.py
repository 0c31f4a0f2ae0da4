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
    Reference,
    bitwise_equal,
    losses,
    records,
    run_dir,
    run_trainer,
    train_config,
    wait_for_step,
    weights,
)

pytestmark = pytest.mark.slow


def test_the_reference_run_trains_and_exports(cpt_reference: Reference, base_model: Path) -> None:
    """The shared uninterrupted run (ZeRO-2, the default). ZeRO-1 and ZeRO-3 train and export in the elastic test
    below, which checks their every step against this run's."""
    assert cpt_reference.config.engine.zero_stage == 2
    out = cpt_reference.run_dir
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
    card = (out / "cpt" / "export" / "README.md").read_text()  # the model card, from the same provenance
    assert f"| training tokens | {provenance['tokens']:,} |" in card and f"`{base_model}`" in card
    assert f"| domain validation | {provenance['validation']['domain_loss']:.4f} |" in card


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


def test_damaged_newest_checkpoints_are_set_aside_and_the_rerun_resumes_from_the_newest_intact_one(
        tmp_path: Path, shards: Path, base_model: Path) -> None:
    """Three kinds of damage to the three newest checkpoints, all found by one rerun, which walks back past them:
    two by their content hashes before loading, the third (too old to list hashes) when DeepSpeed fails to load it."""
    config = train_config(tmp_path, "cpt", shards, base_model)
    kept = ["cpt.steps=8", "cpt.checkpoint.every_steps=2", "cpt.checkpoint.keep_last=4"]
    assert main(["run", str(config), *kept]) == 0
    out = run_dir(tmp_path, "cpt")
    checkpoints = out / "cpt" / "checkpoints"
    names = [f"step-{n:010d}" for n in (2, 4, 6, 8)]
    assert sorted(p.name for p in checkpoints.glob("step-*")) == names
    damage = {"step-0000000008": "bit flip", "step-0000000006": "zeroed block",
              "step-0000000004": "unloadable, hashes unknown"}
    for name, how in damage.items():
        _damage(checkpoints / name, how)
    (out / "cpt" / "export" / "COMPLETE").unlink()  # so that the rerun has the stage to do again
    state = json.loads((out / "state.json").read_text())
    state["stages"]["cpt"]["status"] = "failed"
    (out / "state.json").write_text(json.dumps(state))
    assert main(["run", str(config), *kept]) == 0
    first = records(out, "cpt", "first_step")
    assert len(first) == 2 and first[-1]["resumed"] and first[-1]["step"] == 3, first
    for name, how in damage.items():
        (bad,) = checkpoints.glob(f"{name}.bad*")  # each damaged one kept, none deleted
        why = json.loads((bad / "SET_ASIDE.json").read_text())["problems"]
        expected = "failed: " if how.startswith("unloadable") else "content hash"
        assert any(expected in p for p in why), (how, why)
    assert all((checkpoints / name / "COMPLETE").exists() for name in names), "the rerun saved steps 4-8 anew"
    logs = "".join(p.read_text() for p in log_files(RunDir(out), "cpt", 0))  # the last attempt's
    assert "predates content hashes" in logs and "resumed from step-0000000002 at step 2" in logs


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_run_resumed_on_fewer_ranks_then_on_more_continues_the_same_data(
        tmp_path: Path, shards: Path, base_model: Path, cpt_reference: Reference, stage: int) -> None:
    """2 ranks, then 1, then 2 again, for each ZeRO stage that shards state across ranks, against the uninterrupted
    ZeRO-2 reference: every stage is the same fp32 arithmetic but for the order of its reductions."""
    overrides = [*cpt_reference.overrides, f"cpt.engine.zero_stage={stage}"]
    config = train_config(tmp_path / "elastic", "cpt", shards, base_model)
    if stage == 2:
        assert cpt_reference.same_training(config, overrides), "the first leg trains as the reference did"
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
    first = records(run.path, "cpt", "first_step")
    assert [(f["world"], f["resumed"]) for f in first] == [(2, False), (1, True), (2, True)]
    assert (first[1]["step"], first[2]["step"]) == (stopped + 1, again + 1)
    assert {s["zero_stage"] for s in records(run.path, "cpt", "setup")} == {stage}
    converted = {p.name for p in (run.path / "cpt" / "universal").glob("step-*")}
    assert converted <= {p.name for p in (run.path / "cpt" / "checkpoints").glob("step-*")}, \
        "a conversion is pruned with its checkpoint"
    ref, got = cpt_reference.losses, losses(run.path, "cpt")
    assert stopped < again < 30 and set(got) == set(ref)
    # Before the first resume ZeRO-2 is the reference itself; after the resumes the same samples, only the
    # reduction order differs, as it does between ZeRO stages.
    for step in range(1 if stage != 2 else stopped + 1, 31):
        assert got[step] == pytest.approx(ref[step], rel=1e-4), step
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = run.path / "cpt" / "export"
    model, tokenizer = AutoModelForCausalLM.from_pretrained(export), AutoTokenizer.from_pretrained(export)
    assert model.generate(**tokenizer("The licensee", return_tensors="pt"), max_new_tokens=4,
                          do_sample=False).shape[1] > 2
