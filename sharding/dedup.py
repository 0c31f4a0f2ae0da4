"""Global deduplication: exact (hash of the cleaned text) then near (MinHash LSH), deterministic.

Rows are kept in global document order (earlier rounds first, then input file, then record),
and a duplicate always points at the earliest document of its group, so which documents survive
does not depend on how the work was split into tasks. The index of every kept document (exact
hash and signature) is saved with the shards; a later round loads it and its new documents are
deduplicated against everything written before. The folder's manifest lists the index with its size and
sha256, which a later round checks before it trusts the index with what it drops.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from common.publish import publish_bytes
from sharding.config import DedupConfig
from sharding.minhash import MinHashConfig, MinHasher, duplicate_of, exact_duplicate_of
from sharding.shards import FileInfo, Manifest, ManifestError

INDEX = "dedup-index.arrow"


def _hashes(column: pa.FixedSizeBinaryArray) -> np.ndarray:
    """A fixed_size_binary(16) column as numpy "V16", without a Python object per row."""
    data = column.buffers()[1]
    return np.frombuffer(data, dtype="V16", count=len(column), offset=column.offset * 16)


@dataclass
class DedupIndex:
    exact: np.ndarray  # (n,) "V16" hashes of the cleaned texts ("S16" would drop trailing zero bytes)
    sigs: np.ndarray  # (n, num_perm) uint32 MinHash signatures
    file_index: np.ndarray  # (n,) int64 input file of each row (-1 for rows of earlier rounds)
    record: np.ndarray  # (n,) int64 record within the file
    val: np.ndarray  # (n,) bool: in the validation split
    minhash: dict[str, object]  # the MinHash config the signatures were made with

    def __len__(self) -> int:
        return len(self.exact)

    @classmethod
    def empty(cls, minhash: MinHashConfig) -> DedupIndex:
        return cls(np.empty(0, "V16"), np.empty((0, minhash.num_perm), np.uint32), np.empty(0, np.int64),
                   np.empty(0, np.int64), np.empty(0, bool), asdict(minhash))

    @classmethod
    def _from_tables(cls, tables: Sequence[tuple[int, pa.Table]], minhash: MinHashConfig) -> DedupIndex:
        if not tables:
            return cls.empty(minhash)
        parts = []
        for file_index, table in tables:
            sig = table.column("sig").combine_chunks()
            parts.append((_hashes(table.column("exact").combine_chunks()),
                          sig.flatten().to_numpy().reshape(len(table), -1),
                          np.full(len(table), file_index, np.int64),
                          table.column("record").to_numpy(), table.column("val").to_numpy(zero_copy_only=False)))
        exact, sigs, files, records, val = (np.concatenate(p) for p in zip(*parts, strict=True))
        return cls(exact, sigs.astype(np.uint32), files, records, val.astype(bool), asdict(minhash))

    @classmethod
    def from_work(cls, paths: Sequence[Path], minhash: MinHashConfig) -> DedupIndex:
        """The map step's dedup columns; input file i's are at paths[i] (absent: no document survived)."""
        tables = [(i, pa.ipc.open_file(pa.memory_map(str(p))).read_all()) for i, p in enumerate(paths) if p.exists()]
        return cls._from_tables(tables, minhash)

    @classmethod
    def load_many(cls, folders: Sequence[Path], minhash: MinHashConfig) -> DedupIndex:
        """Indexes of earlier rounds' shard folders, in the order given, each checked against its manifest."""
        tables = []
        for folder in folders:
            path = Path(folder) / INDEX
            if not path.is_file():
                raise ValueError(f"shard.dedup.previous: {folder} has no {INDEX}; is it a finished shard output?")
            try:
                manifest = Manifest.load(Path(folder))
            except ManifestError as e:
                raise ValueError(f"shard.dedup.previous: {e}") from None
            listed = manifest.dedup_index  # None in a format-1 folder, which has only the file to go by
            if listed is None and manifest.format_version > 1:
                raise ValueError(f"shard.dedup.previous: {folder}'s manifest lists no {INDEX}; is it a shard output?")
            with pa.memory_map(str(path), "r") as source:
                data = source.read_buffer()  # hashed and parsed from the same bytes: one read of the file
                if listed is not None and (data.size, hashlib.sha256(memoryview(data)).hexdigest()) != \
                        (listed.bytes, listed.sha256):
                    raise ValueError(f"shard.dedup.previous: {path} is not the index its manifest lists (size or "
                                     "sha256 differs: damaged or replaced); its round's dedup cannot be trusted")
                table = pa.ipc.open_file(data).read_all()
            made_with = json.loads(table.schema.metadata[b"minhash"])
            if made_with != asdict(minhash):
                raise ValueError(f"shard.dedup.previous: {folder} was deduplicated with MinHash settings {made_with}, "
                                 f"not {asdict(minhash)}; signatures are not comparable")
            tables.append((-1, table))
        return cls._from_tables(tables, minhash)

    def extended(self, other: DedupIndex, keep: np.ndarray) -> DedupIndex:
        """This index plus the kept rows of `other` (which become 'earlier rounds' for the next one)."""
        return DedupIndex(np.concatenate([self.exact, other.exact[keep]]),
                          np.concatenate([self.sigs, other.sigs[keep]]),
                          np.full(len(self) + int(keep.sum()), -1, np.int64),
                          np.concatenate([self.record, other.record[keep]]),
                          np.concatenate([self.val, other.val[keep]]), self.minhash)

    def save(self, path: Path) -> FileInfo:
        """Write the index; returns what the manifest lists of it."""
        table = pa.table({
            "exact": pa.Array.from_buffers(pa.binary(16), len(self), [None, pa.py_buffer(self.exact.tobytes())]),
            "sig": pa.FixedSizeListArray.from_arrays(pa.array(self.sigs.reshape(-1)), self.sigs.shape[1]),
            "record": pa.array(self.record), "val": pa.array(self.val),
        }).replace_schema_metadata({"minhash": json.dumps(self.minhash, sort_keys=True)})
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as writer:
            writer.write_table(table)
        data = sink.getvalue().to_pybytes()
        publish_bytes(path, data)
        return FileInfo(path=path.name, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


@dataclass
class Verdict:
    keep: np.ndarray  # (n_current,) bool
    reason: np.ndarray  # (n_current,) reason of each dropped row ("" when kept)
    rep: np.ndarray  # (n_current,) row of the surviving document (-1: an earlier round's)

    def dropped(self) -> Iterator[tuple[int, str, int]]:
        for row in np.flatnonzero(~self.keep):
            yield int(row), str(self.reason[row]), int(self.rep[row])


def find_duplicates(cfg: DedupConfig, previous: DedupIndex, current: DedupIndex) -> Verdict:
    """Which rows of `current` survive, given everything in `previous` came first."""
    n_prev, n = len(previous), len(current)
    position = np.arange(n_prev + n)
    rep = position.copy()
    if cfg.exact and n:
        # Rows are in global order, so their position is the key: the earliest row of each hash survives.
        rep = exact_duplicate_of(position, np.concatenate([previous.exact, current.exact]))
    exact_dup = rep != position
    near_rep = position.copy()
    if cfg.near and n:
        alive = np.flatnonzero(~exact_dup)
        sigs = np.concatenate([previous.sigs, current.sigs])[alive]
        bands = MinHasher(cfg.minhash).band_hashes(sigs)
        near_rep[alive] = alive[duplicate_of(alive.astype(np.int64), sigs, bands, cfg.minhash.threshold)]
    near_dup = near_rep != position
    rep = np.where(exact_dup, rep, near_rep)[n_prev:]
    earlier_round = rep < n_prev
    dup = exact_dup[n_prev:] | near_dup[n_prev:]
    kind = np.where(exact_dup[n_prev:], "dedup.exact", "dedup.near")
    reason = np.where(dup, np.char.add(kind, np.where(earlier_round, "_previous_round", "")), "")
    return Verdict(keep=~dup, reason=reason, rep=np.where(earlier_round, -1, rep - n_prev))
