"""The bucketed form of the dedup keys: what map tasks write, what a bucket task reads, and the duplicate pairs
one bucket yields.

Every document has a 64-bit key that orders documents globally: earlier rounds first, then input file, then
its row (surviving documents of the file, in record order). A round's keys are `base + (unit << 32) + row`,
`base` being one past the last key of every earlier round it reads, so keys never collide and never overflow
below 2^64 (`KeySpace`). Each document goes to `buckets` files twice over: its exact hash to bucket
`hash mod buckets`, and each of its MinHash bands' hash to a bucket of its own. Everything one duplicate
decision needs lands in one bucket: equal texts have equal exact hashes, and the candidates of one LSH band
bucket share the band and its hash. So bucket tasks run in parallel, each holding only its share (memory:
entries / buckets), and the pairs they emit are the same for any number of map tasks or buckets.

A map task's entries are written as runs: every `RUN_DOCS` documents, one record batch per bucket, so a
bucket task reads exactly its batches of every file (Arrow IPC random access) and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from common.publish import commit_file, temp_path
from sharding.config import DedupConfig, MinHashConfig
from sharding.minhash import MinHasher

ROW_BITS = 32  # rows per unit (input file) below 2^32
UNIT_BITS = 24  # units (input files) below 2^24
RUN_DOCS = 1 << 16  # documents per run of bucket batches: bounds a map task's dedup buffer (~37 MB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # spreads band numbers, so band b's hash v and band c's v part ways
_WINDOW = 8  # as minhash.duplicate_of: each LSH bucket member is verified against this many predecessors
_VERIFY_PAIRS = 1 << 16  # candidate pairs compared at once

EXACT_SCHEMA = pa.schema([("h0", pa.uint64()), ("h1", pa.uint64()), ("key", pa.uint64())])
BANDS_SCHEMA = pa.schema([("band", pa.uint16()), ("value", pa.uint64()), ("h0", pa.uint64()), ("h1", pa.uint64()),
                          ("key", pa.uint64())])
PAIRS = np.dtype([("lo", "<u8"), ("hi", "<u8")])  # lo is the earlier document (smaller key)


class KeySpaceError(ValueError):
    """The round's keys would not fit in 64 bits, or a file holds more units or rows than a key encodes."""


@dataclass(frozen=True)
class KeySpace:
    base: int  # first key of this round: earlier rounds' keys are all below it
    units: int  # input files of this round

    def __post_init__(self) -> None:
        if self.units >= 1 << UNIT_BITS:
            raise KeySpaceError(f"{self.units} input files: the dedup keys encode at most {(1 << UNIT_BITS) - 1}")
        if self.end >= 1 << 64:
            raise KeySpaceError(f"dedup keys of this round end at {self.end}, past 2^64: too many earlier rounds "
                                f"(their keys end at {self.base})")

    @property
    def end(self) -> int:
        """One past the last key this round can use."""
        return self.base + (self.units << ROW_BITS)

    def offset(self, unit: int) -> int:
        """Key of row 0 of `unit`."""
        return self.base + (unit << ROW_BITS)

    def unit_of(self, keys: np.ndarray) -> np.ndarray:
        return ((keys - np.uint64(self.base)) >> np.uint64(ROW_BITS)).astype(np.int64)

    def row_of(self, keys: np.ndarray) -> np.ndarray:
        return ((keys - np.uint64(self.base)) & np.uint64((1 << ROW_BITS) - 1)).astype(np.int64)


def exact_words(hashes: Sequence[bytes]) -> np.ndarray:
    """(n, 2) uint64 of 16-byte exact hashes (little-endian words)."""
    return np.frombuffer(b"".join(hashes), "<u8").reshape(-1, 2) if hashes else np.empty((0, 2), np.uint64)


def band_buckets(bands: np.ndarray, buckets: int) -> np.ndarray:
    """(n, bands) bucket of each band hash."""
    numbers = np.arange(bands.shape[1], dtype=np.uint64) * _GOLDEN
    return ((bands ^ numbers) % np.uint64(buckets)).astype(np.int64)


class UnitWriter:
    """One map unit's dedup files: exact entries, band entries (runs of one batch per bucket), and signatures
    (raw uint32 rows, for the bucket tasks' verification of candidate pairs), written to temp files."""

    def __init__(self, paths: tuple[Path, Path, Path], minhash: MinHashConfig, buckets: int) -> None:
        self.paths, self.buckets = paths, buckets
        self.hasher = MinHasher(minhash)
        self.temps = tuple(temp_path(p) for p in paths)
        self.sinks = [pa.OSFile(str(t), "wb") for t in self.temps[:2]]
        meta = {"buckets": str(buckets)}  # a bucket task refuses files of another bucket count by it
        self.schemas = [schema.with_metadata(meta) for schema in (EXACT_SCHEMA, BANDS_SCHEMA)]
        self.writers = [pa.ipc.new_file(s, schema) for s, schema in zip(self.sinks, self.schemas, strict=True)]
        self.sig_file = open(self.temps[2], "wb")  # noqa: SIM115 - closed in close()
        self.rows = 0
        self._exact: list[np.ndarray] = []
        self._sigs: list[np.ndarray] = []
        self._pending = 0

    def add(self, exact: Sequence[bytes], sigs: np.ndarray) -> None:
        self._exact.append(exact_words(exact))
        self._sigs.append(sigs)
        self.sig_file.write(np.ascontiguousarray(sigs, "<u4").tobytes())
        self._pending += len(sigs)
        if self._pending >= RUN_DOCS:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        exact, sigs = np.concatenate(self._exact), np.concatenate(self._sigs)
        rows = np.arange(self.rows, self.rows + len(sigs), dtype=np.uint64)
        self.rows += len(sigs)
        self._exact, self._sigs, self._pending = [], [], 0
        bucket = (exact[:, 0] % np.uint64(self.buckets)).astype(np.int64)
        self._write_run(0, bucket, {"h0": exact[:, 0], "h1": exact[:, 1], "key": rows})
        bands = self.hasher.band_hashes(sigs)
        n, k = bands.shape
        self._write_run(1, band_buckets(bands, self.buckets).reshape(-1), {
            "band": np.tile(np.arange(k, dtype=np.uint16), n), "value": bands.reshape(-1),
            "h0": np.repeat(exact[:, 0], k), "h1": np.repeat(exact[:, 1], k), "key": np.repeat(rows, k)})

    def _write_run(self, kind: int, bucket: np.ndarray, columns: dict[str, np.ndarray]) -> None:
        writer, schema = self.writers[kind], self.schemas[kind]
        order = np.argsort(bucket, kind="stable")
        ends = np.searchsorted(bucket[order], np.arange(1, self.buckets + 1))
        start = 0
        for end in ends:
            part = order[start:end]
            writer.write_batch(pa.record_batch({name: col[part] for name, col in columns.items()}, schema=schema))
            start = end

    def close(self) -> int:
        """Publish the three files; returns the unit's rows."""
        self._flush()
        for writer, sink in zip(self.writers, self.sinks, strict=True):
            writer.close()
            sink.close()
        self.sig_file.close()
        for temp, path in zip(self.temps, self.paths, strict=True):
            commit_file(temp, path)
        return self.rows

    def abandon(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sig_file.close()
        for temp in self.temps:
            temp.unlink(missing_ok=True)


def file_buckets(path: Path) -> int:
    """The bucket count a file's entries were written with."""
    with pa.memory_map(str(path), "r") as source:
        return int(pa.ipc.open_file(source).schema.metadata[b"buckets"])


def read_bucket(path: Path, bucket: int, buckets: int, offset: int) -> dict[str, np.ndarray]:
    """Bucket `bucket` (of `buckets`)'s entries of one file, keys moved by `offset`: every run's batch for it.
    A file written with a bucket count that divides `buckets` (an earlier round's index) is read through its
    bucket `bucket % written`, which holds all of them, and filtered."""
    with pa.memory_map(str(path), "r") as source:
        reader = pa.ipc.open_file(source)
        written = int(reader.schema.metadata[b"buckets"])
        if buckets % written:
            raise ValueError(f"{path} was written with {written} dedup buckets, which does not divide "
                             f"shard.dedup.buckets = {buckets}; use a multiple of {written}")
        parts = [reader.get_batch(i) for i in range(bucket % written, reader.num_record_batches, written)]
        columns = {n: np.concatenate([p.column(n).to_numpy() for p in parts]) if parts
                   else np.empty(0, reader.schema.field(n).type.to_pandas_dtype()) for n in reader.schema.names}
    if written != buckets:
        if "band" in columns:
            mine = (columns["value"] ^ (columns["band"].astype(np.uint64) * _GOLDEN)) % np.uint64(buckets) == bucket
        else:
            mine = columns["h0"] % np.uint64(buckets) == bucket
        columns = {n: c[mine] for n, c in columns.items()}
    columns["key"] = columns["key"] + np.uint64(offset)
    return columns


def concat(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def exact_pairs(entries: dict[str, np.ndarray], first_new: int) -> np.ndarray:
    """(dup, rep) for every entry of this round (key >= first_new) whose exact hash an earlier entry has; rep is
    the earliest document with that hash."""
    order = np.lexsort((entries["key"], entries["h1"], entries["h0"]))
    h0, h1, key = entries["h0"][order], entries["h1"][order], entries["key"][order]
    head = np.concatenate([[True], (h0[1:] != h0[:-1]) | (h1[1:] != h1[:-1])]) if len(key) else np.empty(0, bool)
    rep = key[np.flatnonzero(head)[np.cumsum(head) - 1]]
    dup = ~head & (key >= np.uint64(first_new))
    pairs = np.empty(int(dup.sum()), PAIRS)
    pairs["lo"], pairs["hi"] = rep[dup], key[dup]
    return pairs


def _alive(entries: dict[str, np.ndarray], exact: bool) -> dict[str, np.ndarray]:
    """Band entries of documents that are not exact duplicates. Equal texts have equal signatures, so an exact
    duplicate and its original share every band bucket: it is found in its own band group, no other needed."""
    if not exact or not len(entries["key"]):
        return entries
    e = entries
    order = np.lexsort((e["key"], e["h1"], e["h0"], e["value"], e["band"]))
    s = {n: c[order] for n, c in e.items()}
    later = (s["band"][1:] == s["band"][:-1]) & (s["value"][1:] == s["value"][:-1]) & \
        (s["h0"][1:] == s["h0"][:-1]) & (s["h1"][1:] == s["h1"][:-1])
    keep = np.concatenate([[True], ~later])
    return {n: c[keep] for n, c in s.items()}


def candidate_pairs(entries: dict[str, np.ndarray], exact: bool) -> np.ndarray:
    """Today's LSH candidates (`minhash.duplicate_of`), from one bucket's band entries: within each (band, hash)
    group in key order, every member with its `_WINDOW` predecessors and with the group's first member."""
    e = _alive(entries, exact)
    order = np.lexsort((e["key"], e["value"], e["band"]))
    band, value, key = e["band"][order], e["value"][order], e["key"][order]
    n = len(key)
    if n < 2:
        return np.empty(0, PAIRS)
    starts = np.flatnonzero(np.concatenate([[True], (band[1:] != band[:-1]) | (value[1:] != value[:-1])]))
    size = np.diff(np.append(starts, n))
    pos = np.flatnonzero(np.repeat(size > 1, size))
    head = np.repeat(starts, size)[pos]
    lo, hi = [], []
    for d in range(1, _WINDOW + 1):
        ok = pos - d >= head
        lo.append(pos[ok] - d)
        hi.append(pos[ok])
    far = pos - head > _WINDOW
    lo.append(head[far])
    hi.append(pos[far])
    pairs = np.empty(sum(len(x) for x in lo), PAIRS)
    pairs["lo"], pairs["hi"] = key[np.concatenate(lo)], key[np.concatenate(hi)]
    return np.unique(pairs)  # a pair found in several bands of this bucket is held once


def verified(pairs: np.ndarray, signatures: Callable[[np.ndarray], np.ndarray], threshold: float,
             first_new: int) -> np.ndarray:
    """The candidate pairs whose signatures agree on at least `threshold` of their rows. Pairs of two earlier
    rounds' documents are left out: both are kept whatever they are, so they cannot change this round's verdict."""
    pairs = pairs[pairs["hi"] >= np.uint64(first_new)]
    if not len(pairs):
        return pairs
    needed, inverse = np.unique(np.concatenate([pairs["lo"], pairs["hi"]]), return_inverse=True)
    sigs = signatures(needed)
    lo, hi = inverse[: len(pairs)], inverse[len(pairs):]
    same = np.empty(len(pairs), bool)
    for s in range(0, len(pairs), _VERIFY_PAIRS):
        e = s + _VERIFY_PAIRS
        same[s:e] = (sigs[lo[s:e]] == sigs[hi[s:e]]).mean(axis=1) >= threshold
    return pairs[same]


def bucket_pairs(cfg: DedupConfig, exact: dict[str, np.ndarray] | None, bands: dict[str, np.ndarray] | None,
                 signatures: Callable[[np.ndarray], np.ndarray], first_new: int) -> tuple[np.ndarray, np.ndarray]:
    """(exact pairs, verified near pairs) of one bucket's entries."""
    exact_out = exact_pairs(exact, first_new) if cfg.exact and exact is not None else np.empty(0, PAIRS)
    near_out = np.empty(0, PAIRS)
    if cfg.near and bands is not None:
        near_out = verified(candidate_pairs(bands, cfg.exact), signatures, cfg.minhash.threshold, first_new)
    return exact_out, near_out
