"""The whole pipeline from raw corpora to a report, submitted with one command to the real Slurm cluster."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from launcher.cli import main
from launcher.rundir import RunDir

from .helpers import wait_finished, wait_for, write_config

pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]


def test_shard_cpt_teacher_logits_distill_report_in_one_run(tmp_path: Path, corpora: dict[str, Path],
                                                            tokenizer_dir: Path, teacher_model: Path) -> None:
    config = write_config(tmp_path / "pipeline.toml", {
        "run": {"root": tmp_path / "runs", "name": "all",
                "stages": ["shard", "cpt", "teacher_logits", "distill", "report"]},
        "resources": {"time_min": 20},
        "shard": {"inputs": [corpora["licenses"], corpora["wiki"]], "tokenizer": tokenizer_dir, "seq_len": 64,
                  "val_fraction": 0.2, "tasks": 2},
        "shard.dedup": {"buckets": 2},
        "shard.reader": {"group_field": "group"},
        "cpt": {"steps": 6},
        "cpt.model": {"path": teacher_model},
        "cpt.engine": {"micro_batch": 4},
        "cpt.eval": {"every": 3, "batches": 2},
        "cpt.resources": {"tasks_per_node": 2},
        "teacher_logits": {"k": 16, "batch": 16},
        "distill": {"steps": 6, "student_layers": 2},
        "distill.engine": {"micro_batch": 4},
        "distill.eval": {"every": 3, "batches": 2},
        "distill.resources": {"tasks_per_node": 2},
        "report": {"max_rows": 16},
    })
    assert main(["submit", str(config)]) == 0  # every stage at once, chained with afterok
    run = tmp_path / "runs" / "all"
    assert wait_finished(RunDir(run), "report", timeout=900)["status"] == "completed"
    state = json.loads((run / "state.json").read_text())
    assert {s: e["status"] for s, e in state["stages"].items()} == {
        s: "completed" for s in ("shard", "cpt", "teacher_logits", "distill", "report")}
    jobs = sorted({j.split("_")[0] for e in state["stages"].values() for j in e["job_ids"]})
    # shard map + dedup + cluster + pack + finish, cpt, teacher_logits compute + index, distill student + train, report
    assert len(jobs) == 11

    def slurm_states() -> set[str]:
        return set(subprocess.run(["sacct", "-n", "-P", "-X", "-o", "State", "-j", ",".join(jobs)],
                                  capture_output=True, text=True, check=True).stdout.split())

    # The last task reports done just before its job ends: give Slurm a moment to record it.
    wait_for("every job COMPLETED in Slurm accounting", lambda: slurm_states() == {"COMPLETED"}, timeout=60)
    results = json.loads((run / "report" / "results.json").read_text())
    assert set(results["models"]) == {"base", "teacher", "student"}
    assert (run / "report" / "index.html").exists() and (run / "report" / "perplexity.png").exists()
    provenance = json.loads((run / "distill" / "export" / "provenance.json").read_text())
    assert provenance["topk_cache"] == str(run / "teacher_logits")
    assert main(["submit", str(config)]) == 0  # finished: every stage is skipped, nothing submitted
    assert json.loads((run / "state.json").read_text())["stages"] == state["stages"]
