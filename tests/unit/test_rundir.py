from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from launcher.config import ConfigError
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


def test_a_new_run_directory_is_private_unless_configured_and_an_existing_one_is_left_as_it_is(
        tmp_path: Path) -> None:
    private = RunDir.create(load_run_config(None, [f"run.root={tmp_path}", "run.name=mine"]))
    assert private.path.stat().st_mode & 0o777 == 0o700
    shared = RunDir.create(load_run_config(None, [f"run.root={tmp_path}", "run.name=ours", "run.dir_mode=0750"]))
    assert shared.path.stat().st_mode & 0o777 == 0o750
    (tmp_path / "old").mkdir(mode=0o755)
    (tmp_path / "old").chmod(0o755)
    RunDir.create(load_run_config(None, [f"run.root={tmp_path}", "run.name=old"]))
    assert (tmp_path / "old").stat().st_mode & 0o777 == 0o755
    with pytest.raises(ConfigError, match="dir_mode must be octal permissions that let you in"):
        load_run_config(None, ["run.dir_mode=0070"])


def test_the_lock_kind_can_be_forced_and_is_fixed_when_the_run_is_created(tmp_path: Path) -> None:
    run = RunDir.create(load_run_config(None, [f"run.root={tmp_path}", "run.name=r", "run.lock=file"]))
    assert run.lock_kind == "file"
    again = RunDir.create(load_run_config(None, [f"run.root={tmp_path}", "run.name=r", "run.lock=flock"]))
    assert again.lock_kind == "file"  # every process of a run locks one way, whatever a later config says
    assert RunDir.create(load_run_config(None, [f"run.root={tmp_path}", "run.name=s"])).lock_kind == "flock"
