"""The distill stage: the training loop with a frozen teacher and the KD loss as its objective."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slurm.taskenv import TaskEnv
from training.config import DistillConfig
from training.data import OpenedSource
from training.engine import for_device, load_model, setup_distributed
from training.kd import kd_loss, kd_loss_topk
from training.loop import Objective, TrainPaths, train
from training.student import block_influence, check_same_vocab, choose_layers_by_influence, student_from_teacher
from training.teacher_logits import TopkCache, planned_rows


def prepare_student(cfg: DistillConfig) -> dict[str, Any]:
    """One task, before training: derive the student from the teacher's layers (once, into `cfg.model.path`)
    and check vocabularies. Every path in `cfg` is resolved (the launcher's run layout fills the empty ones)."""
    teacher, student = Path(cfg.teacher), Path(cfg.model.path)
    if cfg.student_layers and not (student / "config.json").exists():
        rows = _calibration_rows(cfg) if cfg.student_layer_choice == "influence" or cfg.student_bridge else None
        layers: dict[str, Any] = {"layers": cfg.student_layers, "provenance": {"layer_choice": "even"}}
        if rows is not None and cfg.student_layer_choice == "influence":
            keep, provenance = _layers_by_influence(cfg, teacher, rows)
            layers = {"keep": keep, "provenance": provenance}
        student_from_teacher(teacher, student, dtype=_student_dtype(cfg.model.dtype, teacher),
                             bridge_rows=rows if cfg.student_bridge else None, **layers)
        if cfg.student_bridge:
            for bridge in json.loads((student / "student.json").read_text())["bridges"]:
                print(f"[student] bridge in layer {bridge['teacher_layer']} for removed layers {bridge['replaces']}: "
                      f"relative error {bridge['relative_error_before']:.3f} -> {bridge['relative_error_after']:.3f}",
                      flush=True)
    check_same_vocab(teacher, student)
    return {"teacher": str(teacher), "student": str(student)}


def _student_dtype(dtype: str, teacher: Path) -> str:
    """What the student is written in: model.dtype, or with "auto" bf16 when the teacher is stored in bf16 (half
    the disk of fp32; training then runs in whatever `for_device` decides), else fp32."""
    if dtype != "auto":
        return dtype
    config = json.loads((teacher / "config.json").read_text())
    return "bf16" if (config.get("dtype") or config.get("torch_dtype")) == "bfloat16" else "fp32"


def _calibration_rows(cfg: DistillConfig) -> torch.Tensor:
    """Rows spread evenly over the first training source: what block influence and bridges are measured on."""
    source = OpenedSource(cfg.data.sources[0], "train")
    n = min(cfg.student_calibration_rows, source.rows)
    if n == 0:
        raise ValueError(f"{source.folder} has no training rows to measure the student's initialisation on")
    rows = torch.from_numpy(np.stack([source.get(i * source.rows // n) for i in range(n)]).astype(np.int64))
    source.close()
    return rows


def _layers_by_influence(cfg: DistillConfig, teacher: Path, rows: torch.Tensor) -> tuple[list[int], dict[str, Any]]:
    """The teacher layers to keep by block influence on the calibration rows."""
    model = load_model(str(teacher), cfg.model.dtype).eval()
    influence = block_influence(model, rows)
    keep = choose_layers_by_influence(influence, cfg.student_layers)
    print(f"[student] block influence per teacher layer: {' '.join(f'{x:.3f}' for x in influence)}\n"
          f"[student] keeping layers {keep} (calibration: {len(rows)} rows of {rows.shape[1]} tokens)", flush=True)
    return keep, {"layer_choice": "influence", "block_influence": [round(x, 6) for x in influence],
                  "calibration_rows": len(rows)}


def _teacher(cfg: DistillConfig, folder: Path, device: torch.device) -> Any:
    """The frozen teacher: a full copy per rank, or with teacher_zero3 its parameters sharded across ranks
    (every forward gathers them layer by layer: slower, but a teacher larger than one device fits)."""
    model = load_model(str(folder), cfg.model.dtype, attention=cfg.model.attention).eval().requires_grad_(False)
    if not cfg.teacher_zero3:
        return model.to(device)
    import deepspeed

    engine = deepspeed.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": cfg.engine.micro_batch, "zero_optimization": {"stage": 3},
        "bf16": {"enabled": cfg.model.dtype == "bf16"}, "steps_per_print": 1 << 30})[0]
    engine.eval()
    return engine


def distill(cfg: DistillConfig, paths: TrainPaths, env: TaskEnv, config_sha256: str) -> dict[str, Any]:
    """Train the student `cfg.model.path` against the teacher `cfg.teacher` (paths resolved by the caller)."""
    teacher_dir = Path(cfg.teacher)
    device = setup_distributed(env)  # before the teacher: a sharded teacher needs the process group
    cfg = for_device(cfg, device)  # the teacher runs in the student's dtype and attention kernel
    kd_args: dict[str, Any] = {"alpha": cfg.alpha, "temperature": cfg.temperature, "divergence": cfg.divergence,
                               "beta": cfg.beta}
    if cfg.topk_cache:
        if len(cfg.data.sources) != 1:
            raise ValueError("distill.topk_cache is aligned with one token source; give exactly one in data.sources")
        tokens = OpenedSource(cfg.data.sources[0])
        cache = TopkCache(Path(cfg.topk_cache), tokens, teacher_dir, cfg.model.document_mask)
        # Before any engine starts: every row the planned steps read (at this world size) must be in the cache.
        batch = cfg.engine.micro_batch * cfg.engine.grad_accum * env.world_size
        cache.refuse_missing(planned_rows(tokens, (cfg.steps * batch, cfg.data.seed)),
                             f"distillation of {cfg.steps} steps x {batch} samples")

        def loss(engine: Any, inputs: dict[str, Any], ids: list[tuple[int, int]]) -> torch.Tensor:
            input_ids = inputs["input_ids"]
            values, indices = cache.batch([row for _, row in ids])
            student_logits = engine(**inputs).logits
            value, _ = kd_loss_topk(student_logits, torch.from_numpy(values).to(input_ids.device),
                                    torch.from_numpy(indices).to(input_ids.device), input_ids,
                                    student_norm=cfg.topk_student_norm, chunk=cfg.kd_chunk, **kd_args)
            return value
    else:
        teacher = _teacher(cfg, teacher_dir, device)

        def loss(engine: Any, inputs: dict[str, Any], ids: list[tuple[int, int]]) -> torch.Tensor:
            with torch.no_grad():  # the teacher sees the documents as the student does (the same `inputs`)
                teacher_logits = teacher(**inputs).logits
            value, _ = kd_loss(engine(**inputs).logits, teacher_logits, inputs["input_ids"], chunk=cfg.kd_chunk,
                               **kd_args)
            return value

    objective = Objective("distill", loss, {"teacher": str(teacher_dir), "kd": kd_args,
                                            "topk_cache": cfg.topk_cache or None,
                                            "topk_student_norm": cfg.topk_student_norm if cfg.topk_cache else None})
    return train(cfg, paths, env, objective, config_sha256)
