"""The CLI's everyday commands import neither torch, transformers nor deepspeed: each costs seconds at start-up,
and only the jobs that train, cache logits or build models need them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.run_config import load_run_config
from launcher.rundir import RunDir

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "deepspeed")

# Runs each command in turn in one fresh interpreter and records which heavy modules are loaded after it.
_SCRIPT = """
import json, sys
from launcher.cli import main
heavy, commands, report = json.loads(sys.argv[1]), json.loads(sys.argv[2]), {}
for argv in commands:
    try:
        code = main(argv)
    except SystemExit as e:  # --help
        code = e.code
    report[" ".join(argv)] = {"code": code, "loaded": sorted(m for m in heavy if m in sys.modules)}
print("REPORT " + json.dumps(report))
"""


def test_light_commands_do_not_import_torch_transformers_or_deepspeed(tmp_path: Path) -> None:
    run = RunDir.create(load_run_config(None, [f"run.root={tmp_path}"]))
    run.update_stage("probe", status="completed", executor="local", tasks=1, job_ids=["4242"])
    run.log_dir("probe").mkdir(parents=True, exist_ok=True)
    (run.log_dir("probe") / "4242_0_log.out").write_text("probe says hello\n")
    run.update_stage("shard", status="submitted", executor="local", tasks=1, job_ids=["999999999"])  # no such pid
    commands = [["--help"], ["config", "configs/probe.toml"], ["config", "--docs"],
                ["submit", "configs/probe.toml", f"run.root={tmp_path / 'dry'}", "--dry-run"],
                ["status", str(run.path)], ["status", str(run.path), "--json"], ["logs", str(run.path)],
                ["cancel", str(run.path)]]
    done = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(HEAVY), json.dumps(commands)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.rsplit("REPORT ", 1)[1])
    assert {k: v["code"] for k, v in report.items()} == {" ".join(c): 0 for c in commands}, done.stderr
    assert {k: v["loaded"] for k, v in report.items()} == {" ".join(c): [] for c in commands}
    assert not (tmp_path / "dry").exists(), "a dry run writes nothing"
    assert json.loads(run.state_path.read_text())["stages"]["shard"]["status"] == "cancelled"


def test_errors_of_modules_loaded_by_their_command_are_one_line_and_exit_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from launcher.cli import main

    assert main(["inspect", str(tmp_path)]) == 2  # ManifestError, from sharding.shards
    err = capsys.readouterr().err
    assert err.startswith(f"stillroom: error: {tmp_path}: no manifest.json") and err.count("\n") == 1, err
    assert main(["run", str(REPO / "configs" / "probe.toml"), f"run.root={tmp_path}", 'run.stages=["cpt"]',
                 "--dry-run"]) == 2  # PreflightError, from launcher.pipeline
    assert capsys.readouterr().err.splitlines()[-1].startswith("stillroom: error: cpt: cpt.model.path")
