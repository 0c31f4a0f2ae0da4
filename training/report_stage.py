"""The report stage: base vs teacher vs student on held-out domain and general text."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slurm.resources import Resources


@dataclass(frozen=True)
class ReportConfig:
    resources: Resources = field(default_factory=Resources)  # one task; a GPU makes the speed figures a GPU's
    base: str = ""  # the base model ("": cpt.model.path)
    domain_val: str = ""  # shard folder whose val split is the domain text ("": cpt.domain_val, else this run's shards)
    general_val: str = ""  # shard folder whose val split is general text ("": cpt.general_val, else none)
    max_rows: int = 64  # validation sequences evaluated per set and model
    batch: int = 8  # sequences per forward pass

    def __post_init__(self) -> None:
        for name in ("max_rows", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


def run_report(cfg: ReportConfig, out: Path, models: dict[str, Path], val_sets: dict[str, Path],
               metrics: dict[str, Path]) -> dict[str, Any]:
    """Compare `models` (the base always; a trained model once its export is COMPLETE) on `val_sets`, with the
    training curves of `metrics` (stage -> metrics.jsonl) that exist."""
    import torch

    from common.publish import COMPLETE
    from training.report import report_table, write_report

    models = {name: path for name, path in models.items() if name == "base" or (path / COMPLETE).exists()}
    metrics = {stage: path for stage, path in metrics.items() if path.exists()}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = write_report(models, val_sets, out, max_rows=cfg.max_rows, batch=cfg.batch, device=device,
                           metrics=metrics)
    from rich.console import Console

    Console().print(report_table(results))
    print(f"[report] {out / 'index.html'}", flush=True)
    return {"report": str(out / "index.html")}
