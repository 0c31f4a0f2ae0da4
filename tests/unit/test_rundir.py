from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from launcher.run_config import load_run_config
from launcher.rundir import RunDir


def _report(args: tuple[str, int]) -> None:
    path, i = args
    RunDir(Path(path)).update_stage("probe", task_done=f"rank-{i}", attempt=1)


def test_concurrent_task_reports_are_all_kept_and_complete_the_stage(tmp_path: Path) -> None:
    run = RunDir.create(load_run_config(None, [f"run.root={tmp_path}"]))
    run.update_stage("probe", status="submitted", tasks=16)
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.map(_report, [(str(run.path), i) for i in range(16)])
    entry = run.read_state()["stages"]["probe"]
    assert sorted(entry["tasks_done"]) == sorted(f"rank-{i}" for i in range(16))
    assert entry["status"] == "completed" and entry["attempts"] == 1


def test_stage_is_not_complete_until_every_task_reported(tmp_path: Path) -> None:
    run = RunDir.create(load_run_config(None, [f"run.root={tmp_path}"]))
    run.update_stage("probe", status="submitted", tasks=2)
    assert run.update_stage("probe", task_done="rank-1")["status"] == "submitted"
    assert run.update_stage("probe", task_done="rank-1")["tasks_done"] == ["rank-1"]  # a rerun reports again
    assert run.update_stage("probe", task_done="rank-0")["status"] == "completed"


def test_unknown_status_is_refused(tmp_path: Path) -> None:
    run = RunDir.create(load_run_config(None, [f"run.root={tmp_path}"]))
    with pytest.raises(ValueError, match="unknown stage status"):
        run.update_stage("probe", status="done")


def test_a_late_task_does_not_hide_a_failed_sibling(tmp_path: Path) -> None:
    run = RunDir.create(load_run_config(None, [f"run.root={tmp_path}"]))
    run.update_stage("probe", status="submitted", tasks=2)
    run.update_stage("probe", status="failed", error="rank-1: boom")
    assert run.update_stage("probe", status="running")["status"] == "failed"
    assert run.update_stage("probe", task_done="rank-0")["status"] == "failed"
    assert run.update_stage("probe", status="submitted")["status"] == "submitted"
