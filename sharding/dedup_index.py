"""The dedup index a finished shard folder keeps for later rounds: its kept documents' bucket entries, per
input file ("part"), in the same runs-of-buckets layout the map writes, plus their signatures by key.

A later round's bucket task reads only its bucket's batches of every part (a sequential read of 1/buckets of
the index), so a new round costs its new documents plus one read of the index, never a load of it. A round's
index lists its own parts and the parts of every round it was deduplicated against (hard-linked, or copied
across filesystems), each with the key offset that places its keys below this round's: `index.json`, listed
in the manifest with its sha256; every part file is listed in it with its size and XXH3, and the map elements
of the next round check those hashes (each part by one element) before any dedup element reads a part.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.checksum import xxh3_file
from common.publish import publish_bytes, publish_json
from sharding.config import MinHashConfig
from sharding.shards import FileInfo, Manifest, ManifestError, sha256_file

INDEX_DIR = "dedup-index"
INDEX_FILE = f"{INDEX_DIR}/index.json"
INDEX_VERSION = 1
KINDS = ("exact", "bands", "keys", "sigs")  # the files of one part


@dataclass(frozen=True)
class Part:
    folder: Path  # the shard folder whose index lists the part
    files: dict[str, dict[str, Any]]  # kind -> {path (relative to folder), bytes, xxh3}
    key_offset: int  # added to the stored keys to place them in the reading round's key space
    key_min: int  # smallest stored key
    key_max: int  # largest stored key
    buckets: int  # bucket count its entries were written with

    def path(self, kind: str) -> Path:
        return self.folder / self.files[kind]["path"]

    def problem(self, full: bool) -> str | None:
        """What is wrong with the part's files, in one line naming the file relative to its folder."""
        for kind in KINDS:
            entry, path = self.files[kind], self.path(kind)
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                return f"{entry['path']}: missing"
            if size != entry["bytes"]:
                return f"{entry['path']}: {size} bytes, the index lists {entry['bytes']}"
            if full and xxh3_file(path) != entry["xxh3"]:
                return f"{entry['path']}: XXH3 differs from the index (damaged or replaced)"
        return None

    def to_json(self, offset: int, folder: Path) -> dict[str, Any]:
        """As listed by the index of `folder`, whose key space places it at `offset`."""
        return {"files": {k: {**v, "path": str(self.path(k).relative_to(folder))} for k, v in self.files.items()},
                "key_offset": offset, "key_min": self.key_min, "key_max": self.key_max, "buckets": self.buckets}


def file_entry(path: Path, folder: Path) -> dict[str, Any]:
    return {"path": str(path.relative_to(folder)), "bytes": path.stat().st_size, "xxh3": xxh3_file(path)}


@dataclass(frozen=True)
class Previous:
    """Every earlier round's parts, placed in this round's key space; `base` is where this round's keys start."""
    parts: tuple[Part, ...]
    base: int
    identity: str = ""  # of the earlier rounds' index.json files, in order: names what was verified and used

    def marker(self, work: Path, k: int) -> Path:
        """Published once part k's XXH3 was checked, by the map element it belongs to."""
        return work / f"previous-{self.identity[:16]}-{k:06d}.ok"

    def verify(self, work: Path, rank: int, world: int) -> None:
        """Map element `rank` of `world` checks the XXH3 of every earlier part k with k % world == rank (one read
        of the index per round, spread over the elements) before any dedup element reads one."""
        for k in range(rank, len(self.parts), world):
            if self.marker(work, k).exists():
                continue
            if problem := self.parts[k].problem(full=True):
                raise ValueError(f"shard.dedup.previous: {self.parts[k].folder}: {problem}; its round's dedup "
                                 "cannot be trusted")
            publish_bytes(self.marker(work, k), b"")

    def unverified(self, work: Path) -> list[int]:
        return [k for k in range(len(self.parts)) if not self.marker(work, k).exists()]

    @classmethod
    def load(cls, folders: Sequence[Path], minhash: MinHashConfig, sizes: bool = False) -> Previous:
        """The indexes of earlier rounds' shard folders, in the order given (the earlier listed, the earlier its
        documents), each index.json checked against its manifest by sha256. `sizes`: every part file's size too
        (the preflight; 4 stat calls a part, so not in every task); the map elements check their XXH3."""
        parts: list[Part] = []
        base, identity = 0, hashlib.sha256()
        for folder in map(Path, folders):
            data, sha256 = read_index(folder, minhash)
            identity.update(f"{folder}\0{sha256}\0".encode())
            for p in data["parts"]:
                part = Part(folder, p["files"], base + p["key_offset"], p["key_min"], p["key_max"], p["buckets"])
                if sizes and (problem := part.problem(full=False)):
                    raise ValueError(f"shard.dedup.previous: {folder}: {problem}")
                parts.append(part)
            base += data["key_end"]
        return cls(tuple(parts), base, identity.hexdigest() if folders else "")

    def starts(self) -> np.ndarray:
        """Each part's first key in this round's key space, in order (parts' key ranges ascend)."""
        return np.array([p.key_offset + p.key_min for p in self.parts], np.uint64)


def read_index(folder: Path, minhash: MinHashConfig) -> tuple[dict[str, Any], str]:
    """index.json of a finished shard folder, checked against the manifest, and its sha256; clear errors for
    everything else."""
    try:
        manifest = Manifest.load(folder)
    except ManifestError as e:
        raise ValueError(f"shard.dedup.previous: {e}") from None
    listed = manifest.dedup_index
    if listed is None or listed.path != INDEX_FILE:
        old = (folder / "dedup-index.arrow").is_file()
        raise ValueError(f"shard.dedup.previous: {folder} " + (
            "has a dedup index in the single-file format of stillroom before the bucketed dedup, which this version "
            "does not read; re-shard that round with this version" if old else
            f"lists no {INDEX_FILE} in its manifest; is it a finished shard output?"))
    if problem := listed.problem(folder, full=True):
        raise ValueError(f"shard.dedup.previous: {problem}; its round's dedup cannot be trusted")
    data: dict[str, Any] = json.loads((folder / INDEX_FILE).read_text())
    if data.get("version") != INDEX_VERSION:
        raise ValueError(f"shard.dedup.previous: {folder / INDEX_FILE}: unknown index version {data.get('version')!r}")
    if data["minhash"] != asdict(minhash):
        raise ValueError(f"shard.dedup.previous: {folder} was deduplicated with MinHash settings {data['minhash']}, "
                         f"not {asdict(minhash)}; signatures are not comparable")
    return data, listed.sha256


def index_problems(folder: Path, full: bool) -> list[str]:
    """What is wrong with a finished folder's index and its parts (for `stillroom inspect --verify`)."""
    manifest = Manifest.load(folder)
    if manifest.dedup_index is None:
        return []
    if problem := manifest.dedup_index.problem(folder, full=True):
        return [problem]
    data = json.loads((folder / INDEX_FILE).read_text())
    parts = [Part(folder, p["files"], 0, p["key_min"], p["key_max"], p["buckets"]) for p in data["parts"]]
    return [problem for part in parts if (problem := part.problem(full))]


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no bytes copied) where both are on one filesystem, else a copy."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def write_index(folder: Path, own: Sequence[Part], previous: Previous, key_end: int,
                minhash: MinHashConfig) -> FileInfo:
    """index.json for `folder`: earlier rounds' parts linked in under dedup-index/r<k>-..., then its own."""
    listed = []
    for k, part in enumerate(previous.parts):
        files = {}
        for kind in KINDS:
            target = folder / INDEX_DIR / f"r{k:05d}-{part.path(kind).name}"
            link_or_copy(part.path(kind), target)
            files[kind] = {**part.files[kind], "path": str(target.relative_to(folder))}
        listed.append(Part(folder, files, 0, part.key_min, part.key_max, part.buckets).to_json(part.key_offset, folder))
    listed += [part.to_json(0, folder) for part in own]
    path = folder / INDEX_FILE
    publish_json(path, {"version": INDEX_VERSION, "minhash": asdict(minhash), "key_end": key_end, "parts": listed})
    return FileInfo(path=INDEX_FILE, bytes=path.stat().st_size, sha256=sha256_file(path))
