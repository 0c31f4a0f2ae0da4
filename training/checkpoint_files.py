"""What a checkpoint folder holds, read without DeepSpeed or torch (`stillroom status` reads it too): the names,
COMPLETE's file list (size, XXH3 and writer per file), hashing a rank's files, and the set-aside ones."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from common.checksum import xxh3_file
from common.publish import fsync_path

COMPLETE = "COMPLETE"
COMPLETE_VERSION = 2  # 1 listed sizes only; 2 lists {"bytes", "xxh3", "rank"} per file
LATEST = "LATEST"
SET_ASIDE = "SET_ASIDE.json"  # inside a `step-N.bad`: when and why it was set aside
NO_COMPLETE = "no COMPLETE"
STEP_DIR = re.compile(r"step-(\d{10,})")
# Unpublished or discarded directories: "step-N.tmp" being written, "step-N.<why>.tmp" moved aside to delete.
TMP_DIR = re.compile(r"step-(\d{10,})(?:\.[a-z]+)?\.tmp")
BAD_DIR = re.compile(r"step-(\d{10,})\.bad(?:\.\d+)?")
RANK_LIST = re.compile(r"\.files-rank(\d{5,})\.json")


class CheckpointUnreadable(OSError):
    """A checkpoint could not be examined (an I/O error other than a missing file): neither good nor bad is known,
    so nothing is set aside or deleted because of it."""


def step_dir_name(step: int) -> str:
    return f"step-{step:010d}"


def set_aside_checkpoints(root: Path) -> list[tuple[str, list[str]]]:
    """(name, problems) of every checkpoint set aside under `root`, newest first: what `stillroom status` reports."""
    found = []
    candidates = Path(root).glob("step-*.bad*") if Path(root).is_dir() else iter(())
    for path in sorted(candidates, key=lambda p: p.name, reverse=True):
        if not (path.is_dir() and BAD_DIR.fullmatch(path.name)):
            continue
        try:
            found.append((path.name, json.loads((path / SET_ASIDE).read_text()).get("problems", [])))
        except (OSError, ValueError):  # set aside by a process killed before it wrote why
            found.append((path.name, []))
    return found


def stat_size(path: Path) -> int | None:
    """The file's size; None when it is not there; CheckpointUnreadable for any other error."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CheckpointUnreadable(f"cannot examine {path}: {e.strerror}") from e


def hash_files(folder: Path, files: Iterable[Path | str]) -> dict[str, dict[str, Any]]:
    """{path relative to folder: {"bytes", "xxh3"}} of `files`, each fsynced first (its data is durable)."""
    listing = {}
    for file in files:
        path = folder / file
        size = fsync_path(path)
        listing[path.relative_to(folder).as_posix()] = {"bytes": size, "xxh3": xxh3_file(path)}
    return listing


def complete_entries(info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """COMPLETE's file list as {rel: {"bytes", ["xxh3", "rank"]}}, for either version."""
    files = info.get("files")
    if not isinstance(files, dict):
        raise ValueError("COMPLETE has no file list")
    return {rel: entry if isinstance(entry, dict) else {"bytes": entry} for rel, entry in files.items()}


def read_complete(path: Path) -> dict[str, Any]:
    """COMPLETE's contents: FileNotFoundError if absent, ValueError if unreadable, CheckpointUnreadable on I/O."""
    try:
        info = json.loads((path / COMPLETE).read_text())
    except FileNotFoundError:
        raise
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"COMPLETE is unreadable: {e}") from None
    except OSError as e:
        raise CheckpointUnreadable(f"cannot read {path / COMPLETE}: {e.strerror}") from e
    if not isinstance(info, dict):
        raise ValueError("COMPLETE is not a JSON object")
    return info
