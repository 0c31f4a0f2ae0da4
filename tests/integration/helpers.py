"""Drive the real CLI and wait on the real run directory."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from launcher.cli import main
from launcher.rundir import RunDir
from launcher.status import refresh

REPO = Path(__file__).resolve().parents[2]
PROBE = REPO / "configs" / "probe.toml"


def cli(*argv: str) -> None:
    assert main(list(argv)) == 0, f"stillroom {' '.join(argv)} failed"


def submit(root: Path, *overrides: str, command: str = "submit") -> RunDir:
    cli(command, str(PROBE), f"run.root={root}", *overrides)
    (run_dir,) = [p for p in root.iterdir() if (p / "state.json").exists()]
    return RunDir(run_dir)


def wait_for(what: str, predicate: Callable[[], Any], timeout: float = 180) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def stage(run: RunDir, name: str = "probe") -> dict[str, Any]:
    return refresh(run)["stages"].get(name, {})  # type: ignore[no-any-return]


def wait_finished(run: RunDir, name: str = "probe", timeout: float = 180) -> dict[str, Any]:
    return wait_for(f"stage {name} to finish", lambda: (e := stage(run, name)).get("status")
                    in ("completed", "failed", "cancelled") and e, timeout)


def reports(run: RunDir, pattern: str = "env-*.json") -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(run.stage_dir("probe").glob(pattern))]
