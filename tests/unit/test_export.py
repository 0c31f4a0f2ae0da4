"""The Hugging Face export: published whole or not at all, and abandoned when a stop signal comes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from launcher.run_config import load_run_config
from sharding.tokenize import train_bpe_tokenizer
from training.export import ExportInterrupted, export_model
from training.tiny import build_tiny_llama


class _Engine:
    """What export_model uses of a DeepSpeed engine (ZeRO 0-2 on one rank): the module, forward, eval/train."""

    def __init__(self, model: Any) -> None:
        self.module = model

    def __call__(self, **kwargs: Any) -> Any:
        return self.module(**kwargs)

    def eval(self) -> None:
        self.module.eval()

    def train(self) -> None:
        self.module.train()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = [f"the {w} carried {n} baskets to the mill" for n in range(40) for w in ("miller", "clerk", "pilot")]
    tokenizer = train_bpe_tokenizer(texts, 200, tmp_path_factory.mktemp("tok"))
    return build_tiny_llama(tokenizer, tmp_path_factory.mktemp("model") / "tiny", hidden=32, layers=1)


def _export(model_dir: Path, out: Path, interrupted: Any) -> dict[str, Any]:
    cfg = load_run_config(None, [f"cpt.model.path={model_dir}", "cpt.engine.zero_stage=0"]).cpt
    engine = _Engine(AutoModelForCausalLM.from_pretrained(model_dir))
    return export_model(engine, cfg, out, None, torch.device("cpu"), 0, provenance={"steps": 1},
                        interrupted=interrupted)


def test_a_stop_signal_during_the_export_leaves_the_old_export_and_no_temp(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    result = _export(model_dir, out, interrupted=lambda: False)
    assert (out / "COMPLETE").read_text() == "ok\n" and result["max_logit_diff"] <= 1e-4
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    asked: list[int] = []

    def second_time() -> bool:  # the signal arrives while the export is being loaded back and checked
        asked.append(1)
        return len(asked) >= 2

    with pytest.raises(ExportInterrupted, match="while checking the export"):
        _export(model_dir, out, interrupted=second_time)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    with pytest.raises(ExportInterrupted, match="while writing the export"):
        _export(model_dir, tmp_path / "fresh", interrupted=lambda: True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
