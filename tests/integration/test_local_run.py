"""`stillroom run` on the embedded local executor: real processes, real rendezvous, no Slurm."""

from __future__ import annotations

import json
from pathlib import Path

from launcher.cli import main

from .helpers import PROBE, reports, submit


def test_local_run_completes_and_a_rerun_skips_it(run_root: Path) -> None:
    run = submit(run_root, "probe.steps=2", "probe.step_seconds=0", command="run")
    entry = run.read_state()["stages"]["probe"]
    assert entry["status"] == "completed" and entry["executor"] == "local"
    assert sorted(e["rank"] for e in reports(run)) == [0, 1] and {e["rank_sum"] for e in reports(run)} == {1}
    before = (run.stage_dir("probe") / "counter-rank-0.json").read_text()
    submit(run_root, "probe.steps=2", "probe.step_seconds=0", command="run")
    assert (run.stage_dir("probe") / "counter-rank-0.json").read_text() == before
    assert json.loads(before)["attempts"] == [{"restart_count": 0, "job_id": entry["job_ids"][0], "start": 0}]


def test_failed_task_fails_the_run_with_a_pointer_to_the_log(run_root: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    code = main(["run", str(PROBE), f"run.root={run_root}", "probe.fail_rank=1", "probe.collective=false"])
    assert code == 1
    assert "stillroom logs" in capsys.readouterr().err
    (run_dir,) = run_root.iterdir()
    entry = json.loads((run_dir / "state.json").read_text())["stages"]["probe"]
    assert entry["status"] == "failed" and "rank-1: RuntimeError" in entry["error"]


def test_invalid_value_is_a_one_line_error_before_any_work(run_root: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["run", str(PROBE), f"run.root={run_root}", "probe.step_seconds=-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "probe.step_seconds must not be negative" in err
    assert list(run_root.iterdir()) == []
