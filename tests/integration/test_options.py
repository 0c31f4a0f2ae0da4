"""Engine and loop options that the reference runs leave at their defaults, each in a real 2-rank cpt run (gloo,
DeepSpeed on CPU): bf16, ZeRO-3 with optimizer and parameter offload, gradient checkpointing, a WSD schedule and
two mixed sources in one run; early stopping and the forgetting alarm ending runs of their own."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from launcher.cli import main
from launcher.run_config import load_run_config
from launcher.rundir import RunDir
from launcher.status import log_files
from training.schedule import lr_at

from .helpers import Reference, records, run_dir, shard, train_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def news_shards(tmp_path_factory: pytest.TempPathFactory, corpora: dict[str, Path], tokenizer_dir: Path) -> Path:
    """A second source, of another kind of text than the training shards (news against licenses and wiki)."""
    return shard(tmp_path_factory.mktemp("news-shards"), [corpora["news"]], tokenizer_dir, "shard.seq_len=64",
                 "shard.val_fraction=0.2")


def test_bf16_zero3_offload_and_checkpointing_train_two_mixed_sources_on_a_wsd_schedule(
        tmp_path: Path, shards: Path, news_shards: Path, base_model: Path) -> None:
    overrides = ["cpt.steps=8", "cpt.log_every=1", "cpt.eval.every=4", "cpt.checkpoint.every_steps=0",
                 "cpt.model.dtype=bf16", "cpt.engine.zero_stage=3", "cpt.engine.offload_optimizer=true",
                 "cpt.engine.offload_params=true", "cpt.model.gradient_checkpointing=true",
                 "cpt.optim.schedule=wsd", "cpt.optim.decay_fraction=0.5", "cpt.optim.grad_clip=0.5",
                 f"cpt.data.sources=[\"{shards}\", \"{news_shards}\"]", "cpt.data.weights=[3, 1]",
                 "cpt.data.names=[\"law+wiki\", \"news\"]", f"cpt.general_val={news_shards}"]
    config = train_config(tmp_path, "cpt", shards, base_model)
    assert main(["run", str(config), *overrides]) == 0
    out = run_dir(tmp_path, "cpt")
    # What the engine ran with, read from the engine itself (not from the config).
    (setup, *_) = records(out, "cpt", "setup")
    assert setup | {"time": 0} == {
        "kind": "setup", "step": 0, "time": 0, "zero_stage": 3, "bf16": True, "param_dtype": "bfloat16",
        "attention": setup["attention"], "gradient_checkpointing": True, "offload_optimizer": "cpu",
        "offload_params": "cpu", "gradient_clipping": 0.5, "micro_batch": 2, "grad_accum": 2,
        "document_mask": True, "world": 2}
    train = records(out, "cpt", "train")
    assert [r["step"] for r in train] == list(range(1, 9))
    optim = load_run_config(config, overrides).cpt.optim
    # The WSD schedule with its re-warm, step by step: 2 warm-up steps, held, then the last half decays.
    assert [r["lr"] for r in train] == pytest.approx([lr_at(s, optim, 8) for s in range(8)])
    assert train[1]["lr"] == train[3]["lr"] == 1e-3 > train[5]["lr"] > train[7]["lr"]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in train), "each step's norm recorded"
    base, *evals = records(out, "cpt", "eval")
    assert base["base"] and evals[-1]["domain_loss"] < base["domain_loss"] and "general_loss" in evals[-1]
    # Both sources fed the global batches in the ratio of their weights (8 steps x 8 samples = 64: 48 and 16).
    final = out / "cpt" / "checkpoints" / "step-0000000008"
    loader = json.loads((final / "train_state.json").read_text())["loader"]
    assert (loader["samples_consumed"], loader["per_source"]) == (64, [48, 16])
    logs = "".join(p.read_text() for p in log_files(RunDir(out), "cpt", 0))
    assert "law+wiki" in logs and "news" in logs, "the mixture is described by source name at start"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "cpt" / "export")
    assert model.dtype == torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(out / "cpt" / "export")
    assert model.generate(**tokenizer("The licensee", return_tensors="pt"), max_new_tokens=4,
                          do_sample=False).shape[1] > 2


def _wrecking_run(tmp_path: Path, shards: Path, news_shards: Path, base: Path, *overrides: str) -> Path:
    """A run that would take 12 steps, from a trained base at an LR that wrecks it: general perplexity on news
    climbs far above the base model's by the first evaluation (step 2)."""
    config = train_config(tmp_path, "cpt", shards, base)
    assert main(["run", str(config), "cpt.optim.lr=5e-2", "cpt.optim.warmup_steps=0", "cpt.eval.every=2",
                 f"cpt.general_val={news_shards}", "cpt.eval.forgetting_pct=5", *overrides]) == 0
    out = run_dir(tmp_path, "cpt")
    assert RunDir(out).read_state()["stages"]["cpt"]["status"] == "completed"
    return out


def test_the_forgetting_alarm_stops_the_run_when_asked(tmp_path: Path, shards: Path, news_shards: Path,
                                                       cpt_reference: Reference) -> None:
    out = _wrecking_run(tmp_path, shards, news_shards, cpt_reference.run_dir / "cpt" / "export",
                        "cpt.eval.forgetting_stop=true")
    (first, *rest) = records(out, "cpt", "eval")[1:]
    assert first["step"] == 2 and first["forgetting_alarm"] and first["forgetting_pct"] > 5 and not rest
    assert first["stop"].startswith("forgetting alarm: general perplexity")
    provenance = json.loads((out / "cpt" / "export" / "provenance.json").read_text())
    assert provenance["steps"] == 2 and provenance["stopped"] == first["stop"]
    assert records(out, "cpt", "checkpoint")[-1] | {"seconds": 0, "time": 0} == {
        "kind": "checkpoint", "step": 2, "time": 0, "path": "step-0000000002", "reason": first["stop"], "seconds": 0}


def test_early_stopping_ends_a_run_the_alarm_only_warned_and_export_best_takes_the_best_checkpoint(
        tmp_path: Path, shards: Path, news_shards: Path, cpt_reference: Reference,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # `stillroom run` prints the stage's progress as it waits (a line per PROGRESS_LINE_S off a terminal): often here.
    monkeypatch.setattr("launcher.pipeline.PROGRESS_LINE_S", 0.0)
    monkeypatch.setattr("launcher.pipeline.PROGRESS_POLL_S", 0.2)
    # The same wrecking run without forgetting_stop: the alarm at step 2 is a warning. No evaluation after the
    # first counts as an improvement (min_delta): with patience 2 the run stops at the third, step 6 of 12.
    # The first is saved as the new best (for the export), the third as the stop.
    out = _wrecking_run(tmp_path, shards, news_shards, cpt_reference.run_dir / "cpt" / "export",
                        "cpt.eval.patience=2", "cpt.eval.min_delta=1e6", "cpt.export=best",
                        "cpt.checkpoint.every_steps=0", "cpt.log_every=1")
    evals = records(out, "cpt", "eval")[1:]
    assert [(e["step"], bool(e.get("best")), e.get("stop")) for e in evals] == [
        (2, True, None), (4, False, None), (6, False, "early stopping: no improvement in 2 evaluations")]
    assert evals[0]["forgetting_alarm"], "the alarm fired, and did not stop the run"
    logs = "".join(p.read_text() for p in log_files(RunDir(out), "cpt", 0))
    assert "WARNING forgetting alarm at step 2" in logs
    provenance = json.loads((out / "cpt" / "export" / "provenance.json").read_text())
    assert (provenance["steps"], provenance["stopped"]) == (6, evals[-1]["stop"])
    assert sorted(p.name for p in (out / "cpt" / "checkpoints").glob("step-*")) == [
        "step-0000000002", "step-0000000006"]
    # The export is the saved checkpoint of the lowest domain loss (min_delta decides when to stop, not which is best).
    best = min((e for e in evals if e["step"] in (2, 6)), key=lambda e: e["domain_loss"])
    assert provenance["weights"] == f"the best checkpoint, step-{best['step']:010d}"
    shown = re.findall(r"cpt: step (\d+)/12, loss [\d.]+, [\d,]+ tok/s, ETA [\d.]+ min", capsys.readouterr().out)
    assert shown and all(1 <= int(step) <= 6 for step in shown), "the run's progress was shown while it ran"
