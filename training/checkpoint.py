"""Crash-safe, content-checked training checkpoints: the save / choose / set-aside / prune protocol.

Only directories and files are known here; the trainer's `write` callback puts DeepSpeed's files (and each
rank's extras) into the directory it is handed and returns the ones it wrote.

* Save: rank 0 makes `step-N.tmp`; every rank writes, then fsyncs and hashes (XXH3) the files it wrote itself
  (only the writer's node can make its data durable on NFS or Lustre) and publishes that list as
  `.files-rankNNNNN.json`; rank 0 hashes whatever nobody claimed, writes `COMPLETE` (every file with its size,
  hash and writer) and renames the folder to `step-N`. A SIGKILL at any point leaves an ignored `*.tmp` or a
  complete checkpoint. `LATEST` is only a convenience for humans and tools.
* Choose (on resume): rank 0 picks the newest checkpoint whose files have their listed sizes; every rank
  re-hashes its share (the files it wrote, which are mostly what it loads) and rank 0 gathers the verdicts. One
  that fails, or whose load fails, is set aside as `step-N.bad` (kept for a person to look at, never deleted,
  reported by `stillroom status`) and the next older one is tried.
* Prune: keep the newest `keep_last` valid checkpoints and the best; only valid ones are ever deleted, a damaged
  one is set aside, and any error other than "file not there" stops the prune: an NFS hiccup must not delete the
  best checkpoint. Folders derived from a checkpoint (its universal conversion) go with it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from common.checksum import xxh3_file
from common.publish import fsync_path, publish_bytes, publish_json
from training.checkpoint_files import (
    COMPLETE,
    COMPLETE_VERSION,
    LATEST,
    NO_COMPLETE,
    RANK_LIST,
    SET_ASIDE,
    STEP_DIR,
    TMP_DIR,
    CheckpointUnreadable,
    complete_entries,
    hash_files,
    read_complete,
    set_aside_checkpoints,
    stat_size,
    step_dir_name,
)

__all__ = ["COMPLETE", "LATEST", "SET_ASIDE", "Checkpointer", "CheckpointUnreadable", "CheckpointWarning",
           "all_gather", "hash_files", "set_aside_checkpoints", "step_dir_name"]

class CheckpointWarning(UserWarning):
    """A checkpoint was skipped, set aside or could not be pruned; the message names it and says why."""


def all_gather(value: Any) -> list[Any]:
    """Every rank's `value`, on every rank (just [value] without a process group)."""
    import torch.distributed as dist  # here, not at the top: `stillroom status` reads set-aside checkpoints

    if not dist.is_initialized():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _or_error(compute: Callable[[], Any]) -> Any:
    """compute()'s result made gatherable (a Path as str), or its CheckpointUnreadable as an error record: every
    rank must reach the next collective, so a rank that cannot read does not leave the others waiting."""
    try:
        result = compute()
    except CheckpointUnreadable as e:
        return {"error": str(e)}
    return str(result) if isinstance(result, Path) else result


def _raise_if_error(gathered: list[Any]) -> None:
    if errors := [g["error"] for g in gathered if isinstance(g, dict)]:
        raise CheckpointUnreadable(f"cannot check a checkpoint: {errors[0]} (nothing was "
                                   "set aside; rerun once the filesystem answers, or move that checkpoint away)")


def _move_aside(path: Path, why: str) -> Path:
    """Rename a directory to `<name>.<why>.tmp`, which latest_valid ignores and prune removes."""
    target = path.with_name(f"{path.name}.{why}.tmp")
    if target.exists():  # from an earlier kill; rename cannot replace a non-empty directory
        shutil.rmtree(target)
    os.rename(path, target)
    return target


class Checkpointer:
    """Saves, chooses, sets aside and prunes `root/step-NNNNNNNNNN` checkpoints written by all ranks together."""

    def __init__(self, root: Path, keep_last: int, rank: int, world: int, barrier: Callable[[], object],
                 derived: Sequence[Path] = ()) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1, got {keep_last}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside a world of {world}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = rank
        self.world = world
        self.barrier = barrier
        self.derived = [Path(p) for p in derived]  # folders holding `step-N` conversions of our checkpoints

    # ------------------------------------------------------------------------------------------------ save

    def save(self, step: int, write: Callable[[Path], Iterable[Path] | None], metric: float | None = None) -> Path:
        """All ranks call this; each one's `write(tmp_dir)` puts its files into tmp_dir and returns the ones it
        wrote (None: let rank 0 hash them). Returns the final path.

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
        written = write(tmp)
        publish_json(tmp / f".files-rank{self.rank:05d}.json", hash_files(tmp, written or ()))
        self.barrier()
        if self.rank == 0:
            self._publish(step, tmp, final, metric)
        self.barrier()
        return final

    def _publish(self, step: int, tmp: Path, final: Path, metric: float | None) -> None:
        existing = self.verify(final) if final.exists() else None  # problems of a save of this step already there
        if existing == []:
            # The same step saved twice (a stop right after a resume, or a periodic and a stop save at one
            # step) holds the same training state. Replacing it would leave a moment with neither under a
            # valid name, so the existing one stays.
            warnings.warn(f"checkpoint {final.name} already exists and is valid; keeping it, discarding this save",
                          CheckpointWarning, stacklevel=3)
            shutil.rmtree(tmp)
            publish_bytes(self.root / LATEST, f"{final.name}\n".encode())
            self.prune()
            return
        files: dict[str, dict[str, Any]] = {}
        for listing in sorted(tmp.glob(".files-rank*.json")):
            writer = int(RANK_LIST.fullmatch(listing.name).group(1))  # type: ignore[union-attr]
            files |= {rel: {**entry, "rank": writer} for rel, entry in json.loads(listing.read_text()).items()}
            listing.unlink()
        # What no rank claimed (a file DeepSpeed writes outside its checkpoint engine) is hashed here.
        unclaimed = [p for p in sorted(tmp.rglob("*")) if p.is_file() and p.relative_to(tmp).as_posix() not in files]
        files |= {rel: {**entry, "rank": 0} for rel, entry in hash_files(tmp, unclaimed).items()}
        for folder in sorted({p.parent for p in tmp.rglob("*")} | {tmp}, key=lambda p: -len(p.parts)):
            fsync_path(folder)  # the files are durable; so must their directory entries be
        publish_json(tmp / COMPLETE, {"version": COMPLETE_VERSION, "step": step, "metric": metric,
                                      "world_size": self.world, "files": files})
        if existing:  # damaged: kept for inspection, out of the way
            self.set_aside(final, existing, then="saved again")
        os.rename(tmp, final)  # the multi-rank protocol: every rank wrote into the deterministic `step-N.tmp`
        fsync_path(self.root)
        publish_bytes(self.root / LATEST, f"{final.name}\n".encode())
        self.prune()

    # ---------------------------------------------------------------------------------------------- verify

    def verify(self, path: Path) -> list[str]:
        """Problems that make `path` unusable, by the listed sizes (cheap: one stat per file); [] when complete.

        Raises CheckpointUnreadable when it cannot tell (an I/O error other than a missing file)."""
        if not path.is_dir():
            return ["not a directory"]
        try:
            info = read_complete(path)
            entries = complete_entries(info)
        except FileNotFoundError:
            return [NO_COMPLETE]
        except ValueError as e:
            return [str(e)]
        problems = []
        match = STEP_DIR.fullmatch(path.name)
        if match and info.get("step") != int(match.group(1)):
            problems.append(f"COMPLETE is for step {info.get('step')!r}, not {int(match.group(1))}")
        for rel, entry in entries.items():
            if Path(rel).is_absolute() or ".." in Path(rel).parts or not isinstance(entry.get("bytes"), int):
                problems.append(f"COMPLETE has a bad entry {rel!r}: {entry!r}")
                continue
            actual = stat_size(path / rel)
            if actual is None:
                problems.append(f"missing file {rel}")
            elif actual != entry["bytes"]:
                problems.append(f"{rel} has {actual} bytes, COMPLETE lists {entry['bytes']}")
        return problems

    def verify_content(self, path: Path) -> list[str]:
        """Re-hash this rank's share of `path`'s files (what it wrote when the rank count is the same; an even
        split otherwise); problems found, [] when every hash matches. A version-1 COMPLETE has no hashes: a
        warning says so and only sizes were checked."""
        try:
            entries = complete_entries(read_complete(path))
        except (FileNotFoundError, ValueError) as e:
            return [str(e) or NO_COMPLETE]
        if not any("xxh3" in e for e in entries.values()):
            if self.rank == 0:
                warnings.warn(f"checkpoint {path.name} predates content hashes: only its file sizes were checked",
                              CheckpointWarning, stacklevel=2)
            return []
        problems = []
        for i, (rel, entry) in enumerate(sorted(entries.items())):
            if int(entry.get("rank", i)) % self.world != self.rank:
                continue
            try:
                actual = xxh3_file(path / rel)
            except FileNotFoundError:
                problems.append(f"missing file {rel}")
                continue
            except OSError as e:
                raise CheckpointUnreadable(f"cannot read {path / rel}: {e.strerror}") from e
            if actual != entry.get("xxh3"):
                problems.append(f"{rel}: content hash {actual} differs from COMPLETE's {entry.get('xxh3')} "
                                f"(rank {self.rank} checked it)")
        return problems

    # ------------------------------------------------------------------------------------ choose, set aside

    def _steps(self, pattern: re.Pattern[str]) -> list[tuple[int, Path]]:
        """(step, path) of root's entries matching `pattern`, newest first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := pattern.fullmatch(p.name))]
        return sorted(found, key=lambda sp: (sp[0], sp[1].name), reverse=True)

    def latest_valid(self) -> Path | None:
        """The newest checkpoint whose files have their listed sizes. Newer damaged ones are set aside (only rank
        0 may call this); CheckpointUnreadable propagates: a checkpoint that cannot be examined is not skipped."""
        for _step, path in self._steps(STEP_DIR):
            if not path.is_dir():
                continue
            if not (problems := self.verify(path)):
                return path
            self.set_aside(path, problems)
        return None

    def choose(self) -> Path | None:
        """Every rank calls this on resume: the newest checkpoint whose content every rank has checked, or None.

        Rank 0 decides and the others follow, so a lagging shared filesystem cannot split the ranks."""
        return self._agreed(self.latest_valid)

    def best_checked(self) -> Path | None:
        """Every rank calls this before exporting the best weights: `best()`, content-checked like `choose`."""
        return self._agreed(self.best)

    def _agreed(self, pick: Callable[[], Path | None]) -> Path | None:
        """Rank 0's pick, once every rank has re-hashed its share of it; a damaged pick is set aside and rank 0
        picks again."""
        while True:
            candidate = all_gather(_or_error(pick) if self.rank == 0 else None)[0]
            _raise_if_error([candidate])
            if candidate is None:
                return None
            if self.intact(Path(candidate)):
                return Path(candidate)

    def intact(self, path: Path) -> bool:
        """Every rank calls this: whether every rank's share of `path` has its listed hashes. If not, rank 0 sets
        it aside, and all ranks return once it has (they may look for another checkpoint next)."""
        shares = all_gather(_or_error(lambda: self.verify_content(path)))
        _raise_if_error(shares)
        problems = [p for share in shares for p in share]
        if problems and self.rank == 0:
            self.set_aside(path, problems)
        self.barrier()
        return not problems

    def set_aside(self, path: Path, problems: list[str], then: str = "using an older one") -> Path:
        """Rename a bad checkpoint to `step-N.bad` (kept, never deleted) with SET_ASIDE.json saying why."""
        target = path.with_name(f"{path.name}.bad")
        n = 0
        while target.exists():
            n += 1
            target = path.with_name(f"{path.name}.bad.{n}")
        os.rename(path, target)
        fsync_path(self.root)
        publish_json(target / SET_ASIDE, {"problems": problems, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                    time.gmtime())})
        self._delete_derived(path.name)  # converted from bad data
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        warnings.warn(f"checkpoint {path.name} is damaged ({shown}); set aside as {target.name}, {then}",
                      CheckpointWarning, stacklevel=2)
        return target

    # ----------------------------------------------------------------------------------------------- prune

    def _metric(self, path: Path) -> float | None:
        metric = read_complete(path).get("metric")
        # NaN never compares lower, so it could never be "best"; treat it as no metric.
        return float(metric) if isinstance(metric, int | float) and not math.isnan(metric) else None

    def _survey(self) -> tuple[list[tuple[int, Path]], list[tuple[Path, list[str]]]]:
        """Valid checkpoints (step, path) newest first, and the damaged ones older than the newest valid one."""
        valid: list[tuple[int, Path]] = []
        damaged: list[tuple[Path, list[str]]] = []
        for step, path in self._steps(STEP_DIR):
            if not (problems := self.verify(path)):
                valid.append((step, path))
            elif valid:  # older than a valid one: a leftover, not a save in progress
                damaged.append((path, problems))
        return valid, damaged

    def _best(self, valid: list[tuple[int, Path]]) -> Path | None:
        scored = [(metric, step, path) for step, path in valid if (metric := self._metric(path)) is not None]
        # Ties go to the earliest step: with a best-so-far metric that is the first save after the best eval.
        return min(scored, key=lambda msp: (msp[0], msp[1]))[2] if scored else None

    def best(self) -> Path | None:
        """The valid checkpoint with the lowest metric (earliest on ties); None if none has a metric."""
        return self._best(self._survey()[0])

    def prune(self) -> None:
        """Keep the newest `keep_last` valid checkpoints and the best (lowest metric); delete the other valid ones.

        Only rank 0 may call this (save does). Damaged checkpoints are set aside, not deleted. Anything newer
        than the newest valid checkpoint is left alone: it is not garbage of a finished save. When a checkpoint
        cannot be examined, nothing is pruned this time.
        """
        try:
            valid, damaged = self._survey()
            keep = {path for _, path in valid[: self.keep_last]} | {self._best(valid)}
        except CheckpointUnreadable as e:
            warnings.warn(f"not pruning {self.root} this time: {e}", CheckpointWarning, stacklevel=2)
            return
        for path, problems in damaged:
            self.set_aside(path, problems)
        doomed = [path for _, path in valid if path not in keep]
        if valid:
            doomed += [path for step, path in self._steps(TMP_DIR) if step <= valid[0][0]]
        doomed += list(self.root.glob(f".{LATEST}.tmp*"))  # publish_bytes' leftovers (.LATEST.tmp.<host>.<pid>)
        for path in doomed:
            self._delete(path)
            if STEP_DIR.fullmatch(path.name):
                self._delete_derived(path.name)
        existing = {path.name for _, path in self._steps(STEP_DIR)}
        for root in self.derived:  # conversions whose checkpoint is gone (pruned or set aside) go too
            for converted in list(root.glob("step-*")) if root.is_dir() else []:
                if STEP_DIR.fullmatch(converted.name) and converted.name not in existing:
                    self._delete_derived(converted.name)

    def _delete_derived(self, name: str) -> None:
        for root in self.derived:
            for path in (root / name, root / f"{name}.failed", root / f"{name}.converting"):
                if path.exists():
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
