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


def run_report(cfg: ReportConfig, out: Path, base: str, domain_val: str, general_val: str) -> dict[str, Any]:
    import torch

    from training.report import report_table, write_report

    run_dir = out.parent
    models = {"base": Path(base)} if base else {}
    for name, stage in (("teacher", "cpt"), ("student", "distill")):
        if (run_dir / stage / "export" / "COMPLETE").exists():
            models[name] = run_dir / stage / "export"
    val_sets = {"domain": Path(domain_val)} if domain_val else {}
    if general_val:
        val_sets["general"] = Path(general_val)
    metrics = {s: run_dir / s / "metrics.jsonl" for s in ("cpt", "distill") if (run_dir / s / "metrics.jsonl").exists()}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = write_report(models, val_sets, out, max_rows=cfg.max_rows, batch=cfg.batch, device=device,
                           metrics=metrics)
    from rich.console import Console

    Console().print(report_table(results))
    print(f"[report] {out / 'index.html'}", flush=True)
    return {"report": str(out / "index.html")}
