"""The shard format, in one place: zstd Arrow IPC files of packed token sequences, and the manifest.

A shard is an Arrow IPC *file* (random access by record batch; memory-map it and only the batch
you read is decompressed) with one column, `input_ids: fixed_size_list<uint16|uint32>[seq_len]`,
one row per packed sequence, in record batches of at least ~1 MB. `manifest.json` beside the
shards records, per shard, its split, rows, tokens, bytes and sha256, and for the whole set the
tokenizer fingerprint, seq_len, dtype and the config hash that produced it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from common.publish import commit_file, publish_json, temp_path

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
BATCH_BYTES = 1 << 20  # record batches of at least this many bytes before compression


class ManifestError(ValueError):
    """The shard folder is missing, incomplete or does not match what the reader expects."""


def token_dtype(vocab_size: int) -> np.dtype[Any]:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the manifest's folder
    split: str  # "train" or "val"
    rows: int  # packed sequences
    tokens: int  # rows * seq_len
    bytes: int  # file size
    sha256: str


@dataclass(frozen=True)
class Manifest:
    seq_len: int
    dtype: str  # "uint16" or "uint32"
    tokenizer_sha256: str  # sha256 of tokenizer.json: readers refuse shards of another tokenizer
    tokenizer_path: str  # where the tokenizer was read from (for `inspect --decode`)
    eos_id: int
    config_sha256: str  # hash of the shard config that produced these shards
    shards: tuple[ShardInfo, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. rounds deduplicated against
    format_version: int = FORMAT_VERSION

    def split_shards(self, split: str) -> list[ShardInfo]:
        return [s for s in self.shards if s.split == split]

    def tokens(self, split: str) -> int:
        return sum(s.tokens for s in self.split_shards(split))

    def sha256(self) -> str:
        """Identity of the data: checkpoints store it, so a resume on other data is refused."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()

    def save(self, folder: Path) -> None:
        publish_json(folder / MANIFEST, asdict(self))

    @classmethod
    def load(cls, folder: Path) -> Manifest:
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise ManifestError(f"{folder}: no {MANIFEST}; is this a finished shard output folder?")
        data = json.loads(path.read_text())
        if data.get("format_version") != FORMAT_VERSION:
            raise ManifestError(f"{path}: shard format {data.get('format_version')} is not {FORMAT_VERSION}")
        shards = tuple(ShardInfo(**s) for s in data.pop("shards"))
        return cls(shards=shards, **data)

    def verify(self, folder: Path, full: bool = True) -> list[str]:
        """Problems found, one line each (empty: all good). `full` re-hashes every shard."""
        problems = []
        for shard in self.shards:
            path = Path(folder) / shard.path
            if not path.is_file():
                problems.append(f"{shard.path}: missing")
            elif path.stat().st_size != shard.bytes:
                problems.append(f"{shard.path}: {path.stat().st_size} bytes, manifest says {shard.bytes}")
            elif full and sha256_file(path) != shard.sha256:
                problems.append(f"{shard.path}: sha256 differs from the manifest (corrupt or changed)")
        return problems


class ShardWriter:
    """Writes one shard: rows go to a temp file, which is fsynced and renamed on `close()`."""

    def __init__(self, path: Path, seq_len: int, dtype: np.dtype[Any], split: str) -> None:
        self.path, self.seq_len, self.dtype, self.split = path, seq_len, dtype, split
        self.tmp = temp_path(path)
        self.batch_rows = max(1, -(-BATCH_BYTES // (seq_len * dtype.itemsize)))
        # Readers map a row to its batch by arithmetic: every batch but the last has batch_rows rows.
        self.schema = pa.schema([("input_ids", pa.list_(pa.from_numpy_dtype(dtype), seq_len))],
                                metadata={"batch_rows": str(self.batch_rows)})
        self.rows = 0
        self._pending: list[np.ndarray] = []
        self._sink = pa.OSFile(str(self.tmp), "wb")
        self._writer = pa.ipc.new_file(self._sink, self.schema, options=pa.ipc.IpcWriteOptions(compression="zstd"))

    def write(self, rows: np.ndarray) -> None:
        """rows: (n, seq_len) array of token ids."""
        self._pending.append(rows.astype(self.dtype, copy=False))
        while sum(len(r) for r in self._pending) >= self.batch_rows:
            rows = np.concatenate(self._pending)
            self._pending = [rows[self.batch_rows:]]
            self._write_batch(rows[: self.batch_rows])

    def _write_batch(self, rows: np.ndarray) -> None:
        flat = pa.array(rows.reshape(-1), type=pa.from_numpy_dtype(self.dtype))
        self._writer.write_batch(pa.record_batch([pa.FixedSizeListArray.from_arrays(flat, self.seq_len)],
                                                 schema=self.schema))
        self.rows += len(rows)

    def close(self) -> ShardInfo:
        if self._pending and (rest := np.concatenate(self._pending)).size:
            self._write_batch(rest)
        self._writer.close()
        self._sink.close()
        commit_file(self.tmp, self.path)
        return ShardInfo(path=self.path.name, split=self.split, rows=self.rows, tokens=self.rows * self.seq_len,
                         bytes=self.path.stat().st_size, sha256=sha256_file(self.path))


class ShardReader:
    """Random access to one shard's rows through a memory map: only the batches read are decompressed."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._source = pa.memory_map(str(self.path), "r")
        self._reader = pa.ipc.open_file(self._source)
        self._batch_rows = int(self._reader.schema.metadata[b"batch_rows"])
        batches = self._reader.num_record_batches
        self.rows = self._batch_rows * (batches - 1) + self._reader.get_batch(batches - 1).num_rows if batches else 0
        self.seq_len = self._reader.schema.field("input_ids").type.list_size

    def __len__(self) -> int:
        return self.rows

    def batch(self, index: int) -> np.ndarray:
        batch = self._reader.get_batch(index)
        return batch.column(0).flatten().to_numpy().reshape(-1, self.seq_len)

    def row(self, i: int) -> np.ndarray:
        if not 0 <= i < self.rows:
            raise IndexError(f"row {i} out of range for {self.path} with {self.rows} rows")
        b, offset = divmod(i, self._batch_rows)
        return self.batch(b)[offset]

    def __iter__(self) -> Iterator[np.ndarray]:
        for b in range(self._reader.num_record_batches):
            yield from self.batch(b)

    def close(self) -> None:
        self._source.close()
