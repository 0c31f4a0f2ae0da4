"""Crash-safe training checkpoints: what is not weights (TrainState, RNG) and the save/validate/prune protocol.

Only directories and files are known here; the trainer's `write` callback puts DeepSpeed's files (and each
rank's extras) into the directory it is handed. A checkpoint is published by renaming `step-N.tmp` to
`step-N` after rank 0 has fsynced every file and written `COMPLETE` inside it, so a SIGKILL at any point
leaves either an ignored `*.tmp` or a complete checkpoint. `COMPLETE` lists every file with its size,
which is what `verify` checks; `LATEST` is only a convenience for humans and tools.
"""

from __future__ import annotations

import base64
import json
import math
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.publish import fsync_path, fsync_tree, publish_bytes, publish_json

STATE_VERSION = 2
# Version 1 also had `scheduler`, `best_metric` and `best_step`, never written (the LR is a pure function of the
# step; the best metric lives in `early_stop`): a version-1 state loads with them dropped.
_DROPPED_IN_2 = ("scheduler", "best_metric", "best_step")
COMPLETE = "COMPLETE"
LATEST = "LATEST"
NO_COMPLETE = "no COMPLETE"
_STEP_DIR = re.compile(r"step-(\d{10,})")
# Unpublished or discarded directories: "step-N.tmp" being written, "step-N.<why>.tmp" moved aside.
_TMP_DIR = re.compile(r"step-(\d{10,})(?:\.[a-z]+)?\.tmp")


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped or could not be pruned; the message names it and says why."""


def step_dir_name(step: int) -> str:
    return f"step-{step:010d}"


@dataclass
class TrainState:
    """Everything a resume needs besides weights and optimizer state, as plain JSON."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # training tokens seen, over all ranks
    loader: dict[str, Any] = field(default_factory=dict)  # opaque, from the data loader
    early_stop: dict[str, Any] = field(default_factory=dict)  # best metric, evals without improvement
    manifest_sha256: list[str] = field(default_factory=list)  # one per data source
    config_sha256: str = ""  # the stage config this state was trained under
    model_fingerprint: str = ""  # the model it started from: a resume onto another model is refused
    tokenizer_sha256: str = ""  # the tokenizer of the data: a resume onto other tokens is refused
    seq_len: int = 0  # packed sequence length: a resume onto another length is refused

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, **asdict(self)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        version = d.get("version")
        if version == 1:
            d = {k: v for k, v in d.items() if k not in _DROPPED_IN_2}
        elif version != STATE_VERSION:
            raise ValueError(f"train state version {version!r} is not supported "
                             f"(this code reads 1 and {STATE_VERSION})")
        names = {f.name for f in fields(self)}
        given = set(d) - {"version"}
        # A schema change must bump the version; silently defaulting a field would resume from a wrong state.
        if missing := sorted(names - given):
            raise ValueError(f"train state version {version} lacks fields: {', '.join(missing)}")
        if unknown := sorted(given - names):
            raise ValueError(f"train state version {version} has unknown fields: {', '.join(unknown)}")
        for name in names:
            setattr(self, name, d[name])

    def compatible_with(self, other: TrainState) -> list[str]:
        """Why a resume from `self` (the checkpoint's state) into `other` (this run) must be refused; [] if fine.

        Config and manifest changes are allowed (e.g. a new learning rate); so is another rank count.
        """
        reasons = []
        if self.tokenizer_sha256 != other.tokenizer_sha256:
            reasons.append(f"tokenizer differs: checkpoint {self.tokenizer_sha256[:16] or '?'}, "
                           f"this run {other.tokenizer_sha256[:16] or '?'}")
        if self.seq_len != other.seq_len:
            reasons.append(f"seq_len differs: checkpoint {self.seq_len}, this run {other.seq_len}")
        if self.model_fingerprint != other.model_fingerprint:
            reasons.append(f"model differs: checkpoint {self.model_fingerprint or '?'}, "
                           f"this run {other.model_fingerprint or '?'}")
        return reasons


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def capture_rng() -> dict[str, Any]:
    """This process's generators as JSON: python `random`, numpy's global one, torch CPU and current CUDA device.

    Only the current CUDA device: asking for all devices would create a CUDA context on every visible GPU
    in every rank.
    """
    py_version, py_internal, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "version": 1,
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": [np_kind, base64.b64encode(np.ascontiguousarray(np_keys, dtype=np.uint32).tobytes()).decode(),
                  int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = _b64(torch.cuda.get_rng_state(torch.cuda.current_device()))
    return state


def restore_rng(d: dict[str, Any]) -> None:
    if d.get("version") != 1:
        raise ValueError(f"RNG state version {d.get('version')!r} is not supported (this code reads 1)")
    py_version, py_internal, py_gauss = d["python"]
    random.setstate((py_version, tuple(py_internal), py_gauss))
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = d["numpy"]
    keys = np.frombuffer(base64.b64decode(np_keys), dtype=np.uint32).copy()
    np.random.set_state((np_kind, keys, np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(_unb64(d["torch"]))
    if "cuda" in d:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(_unb64(d["cuda"]), torch.cuda.current_device())
        else:
            warnings.warn("checkpoint has a CUDA RNG state but CUDA is not available; not restored",
                          CheckpointWarning, stacklevel=2)


def rng_file(folder: Path, rank: int) -> Path:
    """Where rank `rank` keeps its RNG state inside a checkpoint directory."""
    return folder / f"rng-rank{rank:05d}.json"


def _move_aside(path: Path, why: str) -> Path:
    """Rename a directory to `<name>.<why>.tmp`, which latest_valid ignores and prune removes."""
    target = path.with_name(f"{path.name}.{why}.tmp")
    if target.exists():  # from an earlier kill; rename cannot replace a non-empty directory
        shutil.rmtree(target)
    os.rename(path, target)
    return target


class Checkpointer:
    """Saves, validates and prunes `root/step-NNNNNNNNNN` checkpoints written by all ranks together."""

    def __init__(self, root: Path, keep_last: int, rank: int, world: int, barrier: Callable[[], object]) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1, got {keep_last}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside a world of {world}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = rank
        self.world = world
        self.barrier = barrier

    def save(self, step: int, write: Callable[[Path], None], metric: float | None = None) -> Path:
        """All ranks call this; each one's `write(tmp_dir)` puts its files into tmp_dir. Returns the final path.

        An exception on one rank leaves the others waiting in `barrier` until the collective times out;
        nothing is published in that case. A valid checkpoint of the same step is kept, not replaced: to
        roll back, move the newer checkpoints away before resuming (latest_valid would pick them anyway).
        """
        name = step_dir_name(step)
        tmp = self.root / f"{name}.tmp"
        final = self.root / name
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left by an attempt killed mid-save: its files must not leak into this one
                shutil.rmtree(tmp)
            tmp.mkdir()
        self.barrier()
        write(tmp)
        self.barrier()
        if self.rank == 0:
            self._publish(step, tmp, final, metric)
        self.barrier()
        return final

    def _publish(self, step: int, tmp: Path, final: Path, metric: float | None) -> None:
        if final.is_dir() and not self.verify(final):
            # The same step saved twice (a stop right after a resume, or a periodic and a stop save at one
            # step) holds the same training state. Replacing it would leave a moment with neither under a
            # valid name, so the existing one stays.
            warnings.warn(f"checkpoint {final.name} already exists and is valid; keeping it, discarding this save",
                          CheckpointWarning, stacklevel=3)
            shutil.rmtree(tmp)
            publish_bytes(self.root / LATEST, f"{final.name}\n".encode())
            self.prune()
            return
        # Sizes as seen through an open descriptor: fresh on NFS even for files other nodes wrote.
        files = fsync_tree(tmp)
        files.pop(COMPLETE, None)
        publish_json(tmp / COMPLETE, {"version": 1, "step": step, "metric": metric,
                                      "world_size": self.world, "files": files})
        if final.exists():  # damaged: nothing valid is lost by moving it out of the way
            _move_aside(final, "bad")
        os.rename(tmp, final)  # the multi-rank protocol: every rank wrote into the deterministic `step-N.tmp`
        fsync_path(self.root)
        publish_bytes(self.root / LATEST, f"{final.name}\n".encode())
        self.prune()

    def verify(self, path: Path) -> list[str]:
        """Problems that make `path` unusable as a checkpoint; [] when it is complete and intact."""
        if not path.is_dir():
            return ["not a directory"]
        try:
            info = json.loads((path / COMPLETE).read_text())
        except FileNotFoundError:
            return [NO_COMPLETE]
        except (OSError, UnicodeDecodeError, ValueError) as e:
            return [f"COMPLETE is unreadable: {e}"]
        if not isinstance(info, dict) or not isinstance(info.get("files"), dict):
            return ["COMPLETE has no file list"]
        problems = []
        match = _STEP_DIR.fullmatch(path.name)
        if match and info.get("step") != int(match.group(1)):
            problems.append(f"COMPLETE is for step {info.get('step')!r}, not {int(match.group(1))}")
        for rel, size in info["files"].items():
            target = path / rel
            if Path(rel).is_absolute() or ".." in Path(rel).parts or not isinstance(size, int):
                problems.append(f"COMPLETE has a bad entry {rel!r}: {size!r}")
                continue
            try:
                actual = target.stat().st_size
            except OSError:
                problems.append(f"missing file {rel}")
                continue
            if actual != size:
                problems.append(f"{rel} has {actual} bytes, COMPLETE lists {size}")
        return problems

    def _steps(self, pattern: re.Pattern[str]) -> list[tuple[int, Path]]:
        """(step, path) of root's entries matching `pattern`, newest first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := pattern.fullmatch(p.name))]
        return sorted(found, key=lambda sp: (sp[0], sp[1].name), reverse=True)

    def latest_valid(self) -> Path | None:
        """The newest valid checkpoint; newer invalid ones are skipped with a CheckpointWarning naming them.

        Every rank may call this, but on a filesystem with client caches the ranks could disagree: let
        rank 0 decide and broadcast the name.
        """
        skipped: list[tuple[Path, list[str]]] = []
        chosen: Path | None = None
        for _step, path in self._steps(_STEP_DIR):
            if not path.is_dir():
                continue
            problems = self.verify(path)
            if not problems:
                chosen = path
                break
            skipped.append((path, problems))
        using = f"using {chosen.name}" if chosen else "no valid checkpoint left"
        for path, problems in skipped:
            kind = "incomplete" if problems == [NO_COMPLETE] else "invalid"
            shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
            warnings.warn(f"checkpoint {path.name} is {kind} ({shown}), {using}", CheckpointWarning, stacklevel=2)
        return chosen

    def _metric(self, path: Path) -> float | None:
        try:
            metric = json.loads((path / COMPLETE).read_text()).get("metric")
        except (OSError, ValueError, AttributeError):
            return None
        # NaN never compares lower, so it could never be "best"; treat it as no metric.
        return float(metric) if isinstance(metric, int | float) and not math.isnan(metric) else None

    def _survey(self) -> tuple[list[tuple[int, Path]], list[Path]]:
        """Valid checkpoints (step, path) newest first, and the invalid ones older than the newest valid one."""
        valid: list[tuple[int, Path]] = []
        damaged: list[Path] = []
        for step, path in self._steps(_STEP_DIR):
            if not self.verify(path):
                valid.append((step, path))
            elif valid:  # older than a valid one: a leftover, not a save in progress
                damaged.append(path)
        return valid, damaged

    def _best(self, valid: list[tuple[int, Path]]) -> Path | None:
        scored = [(metric, step, path) for step, path in valid if (metric := self._metric(path)) is not None]
        # Ties go to the earliest step: with a best-so-far metric that is the first save after the best eval.
        return min(scored, key=lambda msp: (msp[0], msp[1]))[2] if scored else None

    def best(self) -> Path | None:
        """The valid checkpoint with the lowest metric (earliest on ties); None if none has a metric."""
        return self._best(self._survey()[0])

    def prune(self) -> None:
        """Keep the newest `keep_last` valid checkpoints and the best (lowest metric); delete the rest.

        Only rank 0 may call this (save does). Invalid checkpoints newer than the newest valid one and
        `.tmp` directories newer than it are left alone: they are not garbage of a finished save.
        """
        valid, doomed = self._survey()
        keep = {path for _, path in valid[: self.keep_last]} | {self._best(valid)}
        doomed += [path for _, path in valid if path not in keep]
        if valid:
            doomed += [path for step, path in self._steps(_TMP_DIR) if step <= valid[0][0]]
        doomed += list(self.root.glob(f".{LATEST}.tmp*"))  # publish_bytes' leftovers (.LATEST.tmp.<host>.<pid>)
        for path in doomed:
            self._delete(path)

    def _delete(self, path: Path) -> None:
        try:
            if path.is_dir() and not path.name.endswith(".tmp"):
                # rmtree is not atomic; renaming to an ignored name first means a kill mid-delete leaves
                # garbage for the next prune, not a checkpoint with holes in it.
                path = _move_aside(path, "del")
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError as e:  # a failed clean-up must not stop training
            warnings.warn(f"could not delete {path}: {e}", CheckpointWarning, stacklevel=3)
