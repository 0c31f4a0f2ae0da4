"""The training log: `metrics.jsonl` (every event, appended) and `progress.json` (the latest numbers, for
`stillroom status`), written by rank 0; and the one reader of `metrics.jsonl`."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from common.publish import publish_json

# Events whose numbers also go to progress.json.
_PROGRESS_KINDS = ("train", "eval", "checkpoint", "stop")


class _Counters(Protocol):
    step: int
    tokens: int


class MetricsLog:
    """Appends one JSON line per event, stamped with the step and tokens of `state` at that moment.

    Inactive (every rank but 0) it writes nothing, so the loop calls it the same way on every rank.
    """

    def __init__(self, metrics: Path, progress: Path, state: _Counters, active: bool, **fixed: Any) -> None:
        self.progress_path, self.state, self.active = progress, state, active
        self._file = metrics.open("a") if active else None
        # Carried over from the previous attempt, so status keeps showing the last evaluation after a requeue.
        self.progress: dict[str, Any] = json.loads(progress.read_text()) if active and progress.exists() else {}
        self.progress.update(fixed)

    def record(self, kind: str, **values: Any) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps({"kind": kind, "step": self.state.step, "time": time.time(), **values}) + "\n")
        self._file.flush()
        if kind in _PROGRESS_KINDS:
            if kind == "eval":
                self.progress["forgetting_alarm"] = bool(values.get("forgetting_alarm"))
            self.progress.update({k: v for k, v in values.items() if isinstance(v, int | float | str) and k != "base"},
                                 step=self.state.step, tokens=self.state.tokens, updated=time.time(), last_event=kind)
            publish_json(self.progress_path, self.progress)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_records(path: Path, kind: str | None = None) -> Iterator[dict[str, Any]]:
    """The records of a metrics.jsonl, optionally of one kind; a torn last line (killed mid-write) is skipped."""
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and (kind is None or record.get("kind") == kind):
            yield record
