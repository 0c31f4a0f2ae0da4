"""The distill stage: the training loop with a frozen teacher and the KD loss as its objective."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from slurm.taskenv import TaskEnv
from training.config import DistillConfig
from training.data import OpenedSource
from training.engine import load_model
from training.kd import kd_loss, kd_loss_topk
from training.loop import Objective, train
from training.student import check_same_vocab, student_from_teacher
from training.topk_cache import TopkCache


def teacher_path(cfg: DistillConfig, out: Path) -> Path:
    return Path(cfg.teacher) if cfg.teacher else out.parent / "cpt" / "export"


def student_path(cfg: DistillConfig, out: Path) -> Path:
    return out / "student-init" if cfg.student_layers else Path(cfg.model.path)


def prepare_student(cfg: DistillConfig, out: Path) -> dict[str, Any]:
    """One task, before training: derive the student from the teacher's layers (once) and check vocabularies."""
    teacher, student = teacher_path(cfg, out), student_path(cfg, out)
    if cfg.student_layers and not (student / "config.json").exists():
        student_from_teacher(teacher, student, layers=cfg.student_layers, dtype=cfg.model.dtype)
    check_same_vocab(teacher, student)
    return {"teacher": str(teacher), "student": str(student)}


def distil(cfg: DistillConfig, out: Path, env: TaskEnv, config_sha256: str) -> dict[str, Any]:
    teacher_dir = teacher_path(cfg, out)
    cfg = replace(cfg, model=replace(cfg.model, path=str(student_path(cfg, out))))
    device = torch.device("cuda", env.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    kd_args: dict[str, Any] = {"alpha": cfg.alpha, "temperature": cfg.temperature, "divergence": cfg.divergence,
                               "beta": cfg.beta}
    if cfg.topk_cache:
        if len(cfg.data.sources) != 1:
            raise ValueError("distill.topk_cache is aligned with one token source; give exactly one in data.sources")
        cache = TopkCache(Path(cfg.topk_cache), OpenedSource(cfg.data.sources[0]), teacher_dir)

        def loss(engine: Any, input_ids: torch.Tensor, ids: list[tuple[int, int]]) -> torch.Tensor:
            values, indices = cache.batch([row for _, row in ids])
            student_logits = engine(input_ids=input_ids).logits
            value, _ = kd_loss_topk(student_logits, torch.from_numpy(values).to(input_ids.device),
                                    torch.from_numpy(indices).to(input_ids.device), input_ids, **kd_args)
            return value
    else:
        # Every rank holds the whole frozen teacher; it never sees an optimizer or ZeRO partitioning.
        teacher = load_model(str(teacher_dir), cfg.model.dtype, -1.0, False).to(device).eval().requires_grad_(False)

        def loss(engine: Any, input_ids: torch.Tensor, ids: list[tuple[int, int]]) -> torch.Tensor:
            with torch.no_grad():
                teacher_logits = teacher(input_ids=input_ids).logits
            value, _ = kd_loss(engine(input_ids=input_ids).logits, teacher_logits, input_ids, **kd_args)
            return value

    objective = Objective("distill", loss, {"teacher": str(teacher_dir), "kd": kd_args,
                                            "topk_cache": cfg.topk_cache or None})
    return train(cfg, out, env, objective, config_sha256)
