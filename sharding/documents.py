"""The document record every shard step passes along, and the tally every step counts into.

Invariant of the shard stage: every record read is either kept or dropped under a named
reason, so `docs_in == docs_kept + sum(dropped.values())` always holds.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

SAMPLES_PER_REASON = 5  # path:line examples kept per drop reason, for the log


@dataclass(slots=True)
class Doc:
    text: str
    file_index: int  # position of the input file in the sorted list of all inputs
    record: int  # record number inside that file: JSONL line (0-based), Parquet row, 0 for a text file
    doc_id: str  # the id field's value, else "<file name>:<record>"
    group: str  # what the train/validation split hashes: the group field's value, else the text

    @property
    def key(self) -> tuple[int, int]:
        """Global order of documents: the same whatever the number of tasks."""
        return (self.file_index, self.record)


@dataclass
class Tally:
    """Counters of one task (or, merged, of the whole stage)."""

    docs_in: int = 0  # records read, including those dropped while reading
    docs_kept: int = 0  # documents written to shards
    dropped: Counter[str] = field(default_factory=Counter)  # reason -> documents dropped for it
    samples: dict[str, list[str]] = field(default_factory=dict)  # reason -> a few "path:line: detail"
    files: Counter[str] = field(default_factory=Counter)  # file-level events, e.g. "empty", "truncated_zst"
    modified: Counter[str] = field(default_factory=Counter)  # edits that kept the doc, e.g. "pii.email"

    def drop(self, reason: str, where: str, detail: str = "") -> None:
        self.dropped[reason] += 1
        examples = self.samples.setdefault(reason, [])
        if len(examples) < SAMPLES_PER_REASON:
            examples.append(f"{where}: {detail}" if detail else where)

    def merge(self, other: Tally) -> None:
        self.docs_in += other.docs_in
        self.docs_kept += other.docs_kept
        self.dropped.update(other.dropped)
        self.files.update(other.files)
        self.modified.update(other.modified)
        for reason, examples in other.samples.items():
            mine = self.samples.setdefault(reason, [])
            mine.extend(examples[: max(0, SAMPLES_PER_REASON - len(mine))])

    def state_dict(self) -> dict[str, Any]:
        """Keys sorted: counts merged from map worker processes arrive in another order than counted in one."""
        return {"version": 1, "docs_in": self.docs_in, "docs_kept": self.docs_kept,
                "dropped": dict(sorted(self.dropped.items())), "samples": dict(sorted(self.samples.items())),
                "files": dict(sorted(self.files.items())), "modified": dict(sorted(self.modified.items()))}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Tally:
        if state.get("version") != 1:
            raise ValueError(f"unknown tally version {state.get('version')!r}")
        return cls(docs_in=state["docs_in"], docs_kept=state["docs_kept"], dropped=Counter(state["dropped"]),
                   samples={k: list(v) for k, v in state["samples"].items()}, files=Counter(state["files"]),
                   modified=Counter(state["modified"]))
