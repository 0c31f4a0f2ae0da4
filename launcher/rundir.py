"""The run directory (its paths: launcher/layout.py): the resolved config and the state file, under a lock."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common.publish import publish_bytes, publish_json, publish_once
from launcher.config import config_hash, dump_toml, field_docs, to_plain
from launcher.layout import RunLayout
from launcher.lock import RunLock, probe_lock_kind
from launcher.run_config import RunConfig, load_run_config

STATE_VERSION = 1
# "stopped": its tasks saved and left for a requeue (a stop signal or the time budget); it resumes when run again.
STATUSES = ("pending", "submitted", "running", "stopped", "completed", "failed", "cancelled")


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked; the message says why and what to do."""


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict) or not data:
        return {prefix.rstrip("."): data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        flat.update(flatten(value, f"{prefix}{key}."))
    return flat


def config_diff(old: RunConfig, new: RunConfig) -> list[str]:
    """`key: old -> new` for every resolved key that differs."""
    a, b = flatten(to_plain(old)), flatten(to_plain(new))
    return [f"{k}: {json.dumps(a.get(k))} -> {json.dumps(b.get(k))}" for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k)]


# Keys that change how a run is executed, not what it computes: a run directory accepts new values
# for these (e.g. resume a 2-node job on 1 node, keeping micro_batch x grad_accum x ranks).
_RESUMABLE_CHANGES = ("resources.", "run.executor", "run.dir_mode", "run.lock", "engine.grad_accum",
                      "engine.micro_batch")


def resumable_change(key: str) -> bool:
    return any(key.startswith(p) or f".{p}" in key for p in _RESUMABLE_CHANGES)


def free_run_name(cfg: RunConfig) -> str:
    """`<name>-2`, `<name>-3`, ...: the first name whose run directory does not exist yet."""
    n = 2
    while (cfg.run_dir.parent / f"{cfg.run.name}-{n}").exists():
        n += 1
    return f"{cfg.run.name}-{n}"


class RunDir:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.layout = RunLayout(self.path)
        self.changes: list[str] = []  # resumable config changes accepted when this run was reopened

    config_path = property(lambda self: self.layout.config)
    state_path = property(lambda self: self.layout.state)

    def stage_dir(self, stage: str) -> Path:
        return self.layout.stage(stage)

    def log_dir(self, stage: str) -> Path:
        return self.layout.logs(stage)

    @classmethod
    def find(cls, name_or_path: str, root: str = "runs") -> RunDir:
        """A run given by path, by name under `root`, or by its config file (a .toml: the run directory the file
        alone resolves to, by its `run.root` and `run.name`)."""
        candidates = [Path(name_or_path), Path(root) / name_or_path]
        if name_or_path.endswith(".toml") and Path(name_or_path).is_file():
            from launcher.run_config import load_run_config

            candidates.insert(0, load_run_config(Path(name_or_path)).run_dir)
        for candidate in candidates:
            if RunLayout(candidate).state.is_file():
                return cls(candidate.resolve())
        raise RunDirError(f"no run directory at '{name_or_path}' (looked for state.json "
                          + (f"in {candidates[0]}, " if len(candidates) > 2 else "") + f"there and in {root}/)")

    @classmethod
    def create(cls, cfg: RunConfig) -> RunDir:
        """Create the run directory for `cfg`, or reopen it if it holds the same resolved config up to
        changes of how it runs (resources, executor, batch split; `changes` lists them). Under the run lock:
        of two commands creating one run at once, the second reopens what the first created."""
        run = cls(cfg.run_dir.resolve())
        if not run.path.exists():
            # A run directory is trusted code (submitit unpickles its task files, DeepSpeed its checkpoints):
            # by default only its owner may read or write it.
            run.path.mkdir(parents=True, exist_ok=True)
            run.path.chmod(int(cfg.run.dir_mode, 8))
        run._record_lock_kind(cfg.run.lock)
        with run.locked():
            run._create_or_reopen(cfg)
        return run

    def _create_or_reopen(self, cfg: RunConfig) -> None:
        run = self
        digest = config_hash(cfg)
        run.changes = []
        if run.config_path.exists():
            old = run.load_config()
            if config_hash(old) == digest:
                return
            changes = config_diff(old, cfg)
            refused = [c for c in changes if not resumable_change(c.split(":", 1)[0])]
            if refused:
                raise RunDirError(f"run directory {run.path} holds a different config: {'; '.join(refused[:10])}. "
                                  f"Resume it with its own config, or start a new run with --new-run "
                                  f"(or another run.name)")
            run._write_config(cfg, digest)
            run.changes = changes
            return
        run.layout.log_root.mkdir(parents=True, exist_ok=True)
        run._write_config(cfg, digest)
        publish_json(run.state_path, {"version": STATE_VERSION, "run": cfg.run.name, "config_sha256": digest,
                                      "created_at": now_iso(), "stages": {}})

    def _write_config(self, cfg: RunConfig, digest: str) -> None:
        header = f"# stillroom resolved config, sha256 {digest}\n"
        publish_bytes(self.config_path, (header + dump_toml(cfg, field_docs(RunConfig))).encode())
        if self.state_path.exists():
            with self._locked():
                state = self.read_state()
                state["config_sha256"] = digest
                publish_json(self.state_path, state)

    def load_config(self) -> RunConfig:
        return load_run_config(self.config_path)

    def read_state(self) -> dict[str, Any]:
        state: dict[str, Any] = json.loads(self.state_path.read_text())
        if state.get("version") != STATE_VERSION:
            raise RunDirError(f"{self.state_path}: state version {state.get('version')} is not {STATE_VERSION}; "
                              "this run was made by another stillroom version")
        return state

    @property
    def lock_kind(self) -> str:
        """How this run directory locks ("flock" or "file"); run directories older than the record used flock."""
        try:
            return self.layout.lock_kind.read_text().strip() or "flock"
        except FileNotFoundError:
            return "flock"

    def _record_lock_kind(self, configured: str) -> None:
        """Probe once ("auto"), at creation; of several creators at once the first link wins and all use its
        answer, so every process of the run locks the same way whatever a later config says."""
        if self.layout.lock_kind.exists():
            return
        kind = probe_lock_kind(self.path) if configured == "auto" else configured
        publish_once(self.layout.lock_kind, f"{kind}\n".encode())

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The run lock: held by submit, run and cancel from reading the state to recording their jobs, so two
        of them at once cannot both decide that a stage needs submitting."""
        with RunLock(self.layout.run_lock, self.lock_kind).held():
            yield

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # Tasks on several nodes update one file: the lock must hold across nodes (launcher/lock.py).
        with RunLock(self.layout.state_lock, self.lock_kind).held():
            yield

    def update_stage(self, stage: str, **fields: Any) -> dict[str, Any]:
        """Merge `fields` into the stage's entry under the state lock; returns the new entry.

        `task_done=TAG` appends to the stage's `tasks_done` list, and completes the stage once
        every expected task has reported; `attempt=N` raises `attempts` to N.
        """
        if "status" in fields and fields["status"] not in STATUSES:
            raise ValueError(f"unknown stage status {fields['status']!r}")
        with self._locked():
            state = self.read_state()
            entry = state["stages"].setdefault(stage, {"status": "pending", "job_ids": [], "tasks_done": [],
                                                        "attempts": 0})
            if (tag := fields.pop("task_done", None)) is not None and tag not in entry["tasks_done"]:
                entry["tasks_done"].append(tag)
                if len(entry["tasks_done"]) >= entry.get("tasks", 1):
                    fields = {"status": "completed", "finished_at": now_iso(), **fields}
            late = fields.get("status") in ("running", "stopped", "completed")
            if entry["status"] in ("failed", "cancelled") and late:
                # A late task must not hide that a sibling failed; only a new submission clears it.
                fields.pop("status")
            if (attempt := fields.pop("attempt", None)) is not None:
                entry["attempts"] = max(entry.get("attempts", 0), attempt)
            entry.update(fields)
            publish_json(self.state_path, state)
            return dict(entry)
