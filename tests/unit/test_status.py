"""`stillroom status`: the table a researcher reads, from a real run directory and progress file."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
from rich.console import Console

from launcher.cli import main
from launcher.run_config import load_run_config
from launcher.rundir import RunDir
from launcher.status import refresh, status_table


def _render(run: RunDir) -> str:
    console = Console(record=True, width=250, file=io.StringIO())
    console.print(status_table(run, refresh(run)))
    return console.export_text()


def test_status_shows_training_progress_requeues_and_the_forgetting_alarm(tmp_path: Path) -> None:
    run = RunDir.create(load_run_config(None, [f"run.root={tmp_path}", 'run.stages=["cpt"]']))
    run.update_stage("cpt", status="running", executor="local", tasks=2, attempt=3)
    run.stage_dir("cpt").mkdir()
    (run.stage_dir("cpt") / "progress.json").write_text(json.dumps({
        "objective": "cpt", "step": 120, "total_steps": 400, "tokens": 1966080, "loss": 2.71828,
        "domain_ppl": 15.4321, "general_ppl": 31.5, "forgetting_pct": 12.5, "forgetting_alarm": True,
        "eta_s": 900.0, "updated": time.time()}))
    text = _render(run)
    row = next(line for line in text.splitlines() if line.startswith("│ cpt"))
    for cell in ("running", "120/400", "1,966,080", "2.7183", "15.43 / 31.50", "general ppl +12.5%"):
        assert cell in row, (cell, row)
    assert "│ 2 " in row, "attempt 3 is the second requeue"
    assert "15.0 min" in row or "14.9 min" in row, row


def test_status_of_a_stage_without_progress_and_json_output(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    run = RunDir.create(load_run_config(None, [f"run.root={tmp_path}"]))
    run.update_stage("probe", status="completed", executor="local", tasks=1)
    assert "completed" in _render(run)
    assert main(["status", str(run.path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stages"]["probe"]["status"] == "completed"


def test_status_warns_of_a_checkpoint_set_aside(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from training.checkpoint import Checkpointer

    run = RunDir.create(load_run_config(None, [f"run.root={tmp_path}", 'run.stages=["cpt"]']))
    run.update_stage("cpt", status="running", executor="local", tasks=2)
    checkpoints = Checkpointer(run.layout.checkpoints("cpt"), 2, 0, 1, lambda: None)
    path = checkpoints.save(4, lambda folder: [(folder / "weights.pt").write_bytes(b"w") and folder / "weights.pt"])
    checkpoints.set_aside(path, ["weights.pt: content hash 1 differs from COMPLETE's 2 (rank 0 checked it)"])
    text = _render(run)
    assert ("warning: cpt: checkpoint step-0000000004.bad was set aside as damaged (weights.pt: content hash 1 "
            "differs") in text, text
    assert main(["status", str(run.path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stages"]["cpt"]["set_aside"][0]["checkpoint"] == "step-0000000004.bad"


def test_logs_tail_and_follow_across_a_requeue_until_the_stage_ends(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import threading

    from launcher.status import follow, tail_lines

    run = RunDir.create(load_run_config(None, [f"run.root={tmp_path}", 'run.stages=["cpt"]']))
    run.update_stage("cpt", status="running", executor="local", tasks=1, job_ids=["41"])
    run.log_dir("cpt").mkdir(parents=True, exist_ok=True)
    out = run.log_dir("cpt") / "41_0_log.out"
    out.write_text("".join(f"line {i}\n" for i in range(100_000)))  # 1.2 MB: read from the end, in blocks
    assert tail_lines(out, 3) == "line 99997\nline 99998\nline 99999\n" and tail_lines(out, 0) == ""
    assert main(["logs", str(run.path), "cpt", "--tail", "2"]) == 0
    assert capsys.readouterr().out.endswith("line 99998\nline 99999\n")
    out.write_text("attempt 1\n")
    got: list[str] = []
    follower = threading.Thread(target=follow, args=(run, "cpt", 0, got.append, 0.05))
    follower.start()
    time.sleep(0.3)
    with out.open("a") as f:  # the requeued attempt appends to the same file, a new job writes its own
        f.write("attempt 2\n")
    run.update_stage("cpt", job_ids=["41", "42"])
    (run.log_dir("cpt") / "42_0_log.err").write_text("job 42\n")
    time.sleep(0.3)
    assert follower.is_alive(), "it follows while the stage runs"
    run.update_stage("cpt", status="completed")
    follower.join(timeout=5)
    assert not follower.is_alive() and "".join(got) == "attempt 1\nattempt 2\njob 42\n"


def test_a_run_is_found_by_its_config_file_wherever_its_root_is(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "mine.toml"
    config.write_text(f'[run]\nroot = "{tmp_path / "scratch" / "runs"}"\nname = "law-1b"\nstages = ["cpt"]\n')
    run = RunDir.create(load_run_config(config))
    assert RunDir.find(str(config)).path == run.path == (tmp_path / "scratch" / "runs" / "law-1b").resolve()
    assert main(["status", str(config), "--json"]) == 0 and json.loads(capsys.readouterr().out)["run"] == "law-1b"
    config.write_text('[run]\nname = "never-made"\n')
    assert main(["status", str(config)]) == 2
    assert "no run directory at" in capsys.readouterr().err
