"""The whole pipeline from raw corpora to a report, in one command, on tiny models (embedded executor)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher.cli import main

pytestmark = pytest.mark.slow


def test_shard_cpt_teacher_logits_distill_report_in_one_run(tmp_path: Path, corpora: dict[str, Path],
                                                            tokenizer_dir: Path, teacher_model: Path) -> None:
    config = tmp_path / "pipeline.toml"
    config.write_text("\n".join([
        "[run]", f"root = {json.dumps(str(tmp_path / 'runs'))}", 'name = "all"',
        'stages = ["shard", "cpt", "teacher_logits", "distill", "report"]',
        "[resources]", "time_min = 20",
        "[shard]", f"inputs = {json.dumps([str(corpora['licenses']), str(corpora['wiki'])])}",
        f"tokenizer = {json.dumps(str(tokenizer_dir))}", "seq_len = 64", "val_fraction = 0.2", "tasks = 2",
        "[shard.reader]", 'group_field = "group"',
        "[cpt]", "steps = 6",
        "[cpt.model]", f"path = {json.dumps(str(teacher_model))}",
        "[cpt.engine]", "micro_batch = 4",
        "[cpt.eval]", "every = 3", "batches = 2",
        "[cpt.resources]", "tasks_per_node = 2",
        "[teacher_logits]", "k = 16", "batch = 16",
        "[distill]", "steps = 6", "student_layers = 2",
        "[distill.engine]", "micro_batch = 4",
        "[distill.eval]", "every = 3", "batches = 2",
        "[distill.resources]", "tasks_per_node = 2",
        "[report]", "max_rows = 16", ""]))
    assert main(["run", str(config)]) == 0
    run = tmp_path / "runs" / "all"
    state = json.loads((run / "state.json").read_text())
    assert {s: e["status"] for s, e in state["stages"].items()} == {
        s: "completed" for s in ("shard", "cpt", "teacher_logits", "distill", "report")}
    results = json.loads((run / "report" / "results.json").read_text())
    assert set(results["models"]) == {"base", "teacher", "student"}
    assert (run / "report" / "index.html").exists() and (run / "report" / "perplexity.png").exists()
    provenance = json.loads((run / "distill" / "export" / "provenance.json").read_text())
    assert provenance["topk_cache"] == str(run / "teacher_logits")
    assert main(["run", str(config)]) == 0  # finished: every stage is skipped
