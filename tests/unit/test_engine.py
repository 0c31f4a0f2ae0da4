"""The engine's device defaults (training/engine.py): what "auto" becomes on CPU and what the DeepSpeed config gets
on GPU, and a ZeRO-3 model built partitioned (zero.Init) rather than whole on every rank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from launcher.run_config import load_run_config
from sharding.tokenize import train_bpe_tokenizer
from tests.conftest import free_port, one_rank_group
from training.engine import deepspeed_config, for_device
from training.tiny import build_tiny_llama


def test_auto_is_fp32_and_transformers_attention_on_cpu_and_explicit_choices_stay() -> None:
    cfg = load_run_config(None, []).cpt
    assert (cfg.model.dtype, cfg.model.attention) == ("auto", "auto")
    cpu = for_device(cfg, torch.device("cpu"))
    assert (cpu.model.dtype, cpu.model.attention) == ("fp32", "auto")
    explicit = for_device(load_run_config(None, ["cpt.model.dtype=bf16", "cpt.model.attention=eager"]).cpt,
                          torch.device("cpu"))
    assert (explicit.model.dtype, explicit.model.attention) == ("bf16", "eager")


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_gpu_runs_overlap_gradient_reduction_and_cpu_runs_keep_deepspeeds_defaults(stage: int) -> None:
    cfg = load_run_config(None, [f"cpt.engine.zero_stage={stage}"]).cpt
    gpu, cpu = deepspeed_config(cfg, on_gpu=True)["zero_optimization"], deepspeed_config(cfg, on_gpu=False)
    assert "overlap_comm" not in cpu["zero_optimization"] and "contiguous_gradients" not in cpu["zero_optimization"]
    if stage in (1, 2):
        assert gpu["overlap_comm"] is True and gpu["contiguous_gradients"] is True
    else:  # stage 3 overlaps already; stage 0 reduces nothing of its own
        assert "overlap_comm" not in gpu
    off = load_run_config(None, [f"cpt.engine.zero_stage={stage}", "cpt.engine.overlap_comm=false"]).cpt
    assert deepspeed_config(off, on_gpu=True)["zero_optimization"].get("overlap_comm", False) is False


def _load_zero3(rank: int, port: int, model_dir: Path, out: Path) -> None:
    with one_rank_group(port):
        from training.engine import load_for_engine

        shapes = {}
        for stage in (2, 3):
            cfg = load_run_config(None, [f"cpt.model.path={model_dir}", f"cpt.engine.zero_stage={stage}"]).cpt
            model = load_for_engine(for_device(cfg, torch.device("cpu")), on_gpu=False)
            shapes[stage] = [[p.numel(), getattr(p, "ds_numel", None)] for p in model.parameters()]
        out.write_text(json.dumps(shapes))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-layer tiny Llama, read (never written) by the spawned engines below."""
    folder = tmp_path_factory.mktemp("engine")
    tokenizer = train_bpe_tokenizer(["the miller's tale of a mill and its miller"] * 20, 300, folder / "tok")
    return build_tiny_llama(tokenizer, folder / "tiny", hidden=32, layers=1)


@pytest.mark.timeout(120)
def test_a_zero3_model_is_partitioned_as_it_is_built(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "shapes.json"
    mp.spawn(_load_zero3, args=(free_port(), model_dir, out), nprocs=1, join=True)  # its own process group
    shapes = json.loads(out.read_text())
    # ZeRO-2: whole tensors, as from_pretrained makes them. ZeRO-3: before any engine exists, every parameter
    # is already a partitioned ZeRO-3 parameter: an empty local tensor, its full size in ds_numel.
    assert all(numel > 0 and ds is None for numel, ds in shapes["2"])
    assert all(numel == 0 and ds > 0 for numel, ds in shapes["3"])
    assert [ds for _, ds in shapes["3"]] == [numel for numel, _ in shapes["2"]]


def _clipped_steps(rank: int, port: int, model_dir: Path, out: Path) -> None:
    """One optimizer step of the same model on the same batch, unclipped and clipped far below the gradient's norm:
    the norm each engine records, the norm computed by hand, and how far each step moved the weights."""
    with one_rank_group(port):
        from training.engine import build_engine, load_model

        reference = load_model(str(model_dir), "fp32", dropout=0.0)
        ids = (torch.arange(64).reshape(2, 32) * 31 % reference.config.vocab_size).long()
        reference(input_ids=ids, labels=ids).loss.backward()
        by_hand = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in reference.parameters()])).item()
        results: dict[str, dict[str, float]] = {}
        for clip in (0.0, 1e-9):
            # weight decay off: only the gradient moves the weights
            cfg = load_run_config(None, [f"cpt.model.path={model_dir}", f"cpt.optim.grad_clip={clip}",
                                         "cpt.optim.weight_decay=0", "cpt.optim.lr=1e-2"]).cpt
            engine = build_engine(cfg, load_model(str(model_dir), "fp32", dropout=0.0), on_gpu=False)
            before = [p.detach().clone() for p in engine.module.parameters()]
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
            moved = max((p.detach() - b).abs().max().item() for p, b in zip(engine.module.parameters(), before,
                                                                             strict=True))
            results[str(clip)] = {"recorded_norm": float(engine.get_global_grad_norm()), "moved": moved}
        out.write_text(json.dumps({"by_hand": by_hand, **results}))


@pytest.mark.timeout(120)
def test_gradient_clipping_bounds_the_step_and_the_recorded_norm_is_the_gradients(model_dir: Path,
                                                                                   tmp_path: Path) -> None:
    out = tmp_path / "clip.json"
    mp.spawn(_clipped_steps, args=(free_port(), model_dir, out), nprocs=1, join=True)  # its own process group
    got = json.loads(out.read_text())
    # The train line's grad_norm is the gradient's norm before clipping, whatever the clip.
    for clip in ("0.0", "1e-09"):
        assert got[clip]["recorded_norm"] == pytest.approx(got["by_hand"], rel=1e-4), clip
    assert got["by_hand"] > 1e-3  # so 1e-9 clips it by six orders of magnitude
    # AdamW's first step moves each weight by lr x g / (|g| + eps): about lr unclipped. Clipped to a norm of 1e-9,
    # every |g| is far below eps (1e-8), and the step shrinks with it.
    assert got["0.0"]["moved"] == pytest.approx(1e-2, rel=0.05)
    assert got["1e-09"]["moved"] < 1e-3
