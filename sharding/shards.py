"""The shard format, in one place: zstd Arrow IPC files of packed token sequences, and the manifest.

A shard is an Arrow IPC *file* (random access by record batch: only the batch you read is read and
decompressed, see sharding/shard_reader.py) with one column, `input_ids: fixed_size_list<uint16|uint32>[seq_len]`,
one row per packed sequence, in record batches of BATCH_BYTES (16 KiB) of tokens or one row if a row is larger.
`manifest.json` beside the shards records, per shard, its split, rows, tokens, bytes and sha256, and for the whole
set the tokenizer fingerprint, seq_len, dtype and the config hash that produced it.

Each shard has a table of its record batches (offset, length and XXH3-64 of the stored bytes: see
sharding/batch_table.py), which the reader checks every batch against before decoding it. Format 2 kept the table
in the manifest; format 3 keeps it in `<stem>.batches` beside the shard, and the manifest the hashes of its blocks.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa

from common.checksum import xxh3_bytes
from common.publish import commit_file, publish_bytes, publish_json, temp_path
from sharding import batch_table as tables
from sharding.batch_table import BATCH_TABLE, BatchTable, TableError, damaged_batches, table_name

FORMAT_VERSION = 3
READABLE_FORMATS = (1, 2, 3)  # format 1 has no batch tables: only sizes (and sha256 on request) can be checked
MANIFEST = "manifest.json"
# Record batches of at least this many bytes of tokens before compression, and no more rows than that takes: a
# random row decodes its whole batch, so with rows of 4 KiB (2,048 uint16 tokens) a row read decodes at most 4 rows.
# Smaller batches cost more than they save: ~65 us and ~300 bytes of IPC metadata a batch (docs/sharding.md).
BATCH_BYTES = 16 << 10
IPC_MAGIC = b"ARROW1"  # an IPC file starts with these 6 bytes and 2 of padding, then the schema message


class ManifestError(ValueError):
    """The shard folder is missing, incomplete or does not match what the reader expects."""


class ShardCorrupt(ManifestError):
    """A shard's stored bytes are not the ones its manifest recorded: the file is damaged."""


class ShardFormatWarning(UserWarning):
    """A shard folder of an older format: it loads, with fewer checks."""


def token_dtype(id_bound: int) -> np.dtype[Any]:
    """The shard dtype for token ids 0 .. id_bound - 1 (id_bound: the highest id the tokenizer can produce, + 1)."""
    if id_bound <= 1 << 16:
        return np.dtype(np.uint16)
    if id_bound <= 1 << 32:
        return np.dtype(np.uint32)
    raise ValueError(f"token ids up to {id_bound - 1} do not fit uint32, the widest shard dtype")


def as_token_ids(values: np.ndarray, dtype: np.dtype[Any], where: str) -> np.ndarray:
    """`values` as `dtype`, refusing an integer that does not fit: numpy's astype would store 70000 as 4464 in
    uint16. Non-integer dtypes (the teacher cache's float16) convert as they are."""
    if values.dtype == dtype or dtype.kind not in "iu":
        return values.astype(dtype, copy=False)
    if values.dtype.kind not in "iub":
        raise ValueError(f"{where}: token ids must be integers, got {values.dtype}")
    if values.size and not np.can_cast(values.dtype, dtype):
        limits, low, high = np.iinfo(dtype), int(values.min()), int(values.max())
        if low < limits.min or high > limits.max:
            raise ValueError(f"{where}: token id {high if high > limits.max else low} does not fit {dtype.name} "
                             f"({limits.min}..{limits.max}); the shard dtype comes from the tokenizer's highest id")
    return values.astype(dtype, copy=False)


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
    batches: str = ""  # format 2: base64 of the BATCH_TABLE of its record batches; "" in formats 1 and 3
    table: str = ""  # format 3: base64 of the XXH3-64 of each block of its table file; "": no table (or no batches)
    table_bytes: int = 0  # format 3: the size of its table file, `<stem>.batches` (20 bytes a record batch)
    batch_rows: int = 0  # format 3: rows per record batch (all but the last); older formats: in the schema only
    dtype: str = ""  # format 3: its values' dtype, as its schema says (a teacher cache's splits differ in it)

    def batch_table(self, folder: Path) -> BatchTable | None:
        """Its table of record batches (None in format 1), whose entries are checked as they are read."""
        try:
            if self.table:
                return BatchTable.from_file(Path(folder) / table_name(self.path), self.table_bytes,
                                            tables.decode(self.table, "<u8", self.path))
            if self.batches:
                entries = tables.decode(self.batches, BATCH_TABLE, self.path)
                return BatchTable(len(entries), entries=entries)
        except TableError as e:
            raise ShardCorrupt(str(e)) from None
        return None

    def table_problem(self, folder: Path, full: bool) -> str | None:
        """What is wrong with its table file, in one line (`full`: every block checked); None when it matches."""
        if not self.table:
            return None
        problem = FileInfo(table_name(self.path), self.table_bytes, "").problem(folder, full=False)
        if problem is None and full:
            try:
                table = self.batch_table(folder)
                assert table is not None
                table.entries()
            except (ShardCorrupt, TableError) as e:
                problem = f"{table_name(self.path)}: {str(e).split(': ', 1)[-1]}"
        return problem


@dataclass(frozen=True)
class FileInfo:
    """A file of the folder other than a shard (the dedup index), checked by size and sha256."""

    path: str  # relative to the manifest's folder
    bytes: int
    sha256: str

    def problem(self, folder: Path, full: bool = True) -> str | None:
        """What is wrong with the file in `folder`, in one line; None when it matches (`full`: also its sha256)."""
        path = Path(folder) / self.path
        if not path.is_file():
            return f"{self.path}: missing"
        if (size := path.stat().st_size) != self.bytes:
            return f"{self.path}: {size} bytes, manifest says {self.bytes}"
        if full and sha256_file(path) != self.sha256:
            return f"{self.path}: sha256 differs from the manifest (corrupt or changed)"
        return None


def _outside(folder: Path, path: str) -> bool:
    """Whether `path` (from a manifest) names something outside `folder` (resolved): absolute, with "..", or
    through a symlink leading out. Only symlinks are resolved: a plain name costs one lstat, not a realpath."""
    parts = PurePosixPath(path).parts
    if not parts or PurePosixPath(path).is_absolute() or ".." in parts or "\\" in path:
        return True
    current = folder
    for part in parts:
        current = current / part
        if current.is_symlink():
            return not (folder / path).resolve().is_relative_to(folder)
    return False


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
    dedup_index: FileInfo | None = None  # the dedup index's index.json, which a later round reads

    def split_shards(self, split: str) -> list[ShardInfo]:
        return [s for s in self.shards if s.split == split]

    def tokens(self, split: str) -> int:
        return sum(s.tokens for s in self.split_shards(split))

    def to_json(self) -> dict[str, Any]:
        """As saved. Fields that format 1 lacked are left out while empty, so a format-1 manifest keeps the sha256
        it had: checkpoints record it, and an upgrade must not make them refuse the very same data."""
        data = asdict(self)
        for shard in data["shards"]:
            for name in ("batches", "table", "table_bytes", "batch_rows", "dtype"):
                if not shard[name]:
                    del shard[name]
        if data["dedup_index"] is None:
            del data["dedup_index"]
        return data

    def sha256(self) -> str:
        """Identity of the data: checkpoints store it, so a resume on other data is refused."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()

    def save(self, folder: Path) -> None:
        publish_json(folder / MANIFEST, self.to_json())

    @classmethod
    def load(cls, folder: Path) -> Manifest:
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise ManifestError(f"{folder}: no {MANIFEST}; is this a finished shard output folder?")
        data = json.loads(path.read_text())
        version = data.get("format_version")
        if version not in READABLE_FORMATS:
            raise ManifestError(f"{path}: shard format {version} is not one this stillroom reads "
                                f"({', '.join(map(str, READABLE_FORMATS))})")
        if version == 1:
            warnings.warn(f"{folder}: shard format 1 has no per-batch checksums; only shard sizes can be checked "
                          "for this folder (re-shard it for format 2)", ShardFormatWarning, stacklevel=2)
        shards = tuple(ShardInfo(**s) for s in data.pop("shards"))
        index = data.pop("dedup_index", None)
        manifest = cls(shards=shards, dedup_index=FileInfo(**index) if index else None, **data)
        root = Path(folder).resolve()
        named = [s.path for s in shards] + [table_name(s.path) for s in shards if s.table] + \
            ([manifest.dedup_index.path] if manifest.dedup_index else [])
        if bad := next((p for p in named if _outside(root, p)), None):
            raise ManifestError(f"{path}: file path {bad!r} is not inside the folder; refused")
        return manifest

    def verify(self, folder: Path, full: bool = True) -> list[str]:
        """Problems found, one line each (empty: all good). `full` re-hashes every shard; a shard whose sha256
        differs is searched for damaged record batches. The dedup index: `sharding.dedup_index.index_problems`."""
        problems = []
        for shard in self.shards:
            table_problem = shard.table_problem(folder, full)
            problem = FileInfo(shard.path, shard.bytes, shard.sha256).problem(folder, full=False)
            if problem is None and full and sha256_file(Path(folder) / shard.path) != shard.sha256:
                problem = f"{shard.path}: sha256 differs from the manifest (corrupt or changed)"
                if table_problem is None and (table := shard.batch_table(folder)) is not None:
                    bad = damaged_batches(Path(folder) / shard.path, table)
                    problem += (f"; damaged record batches: {', '.join(map(str, bad))} of {len(table)}" if bad else
                                f"; its {len(table)} record batches are intact: the damage is in its schema or footer")
            problems += [p for p in (problem, table_problem) if p is not None]
        return problems


class ShardWriter:
    """Writes one shard: rows go to a temp file, which is fsynced and renamed on `close()`."""

    def __init__(self, path: Path, seq_len: int, dtype: np.dtype[Any], split: str,
                 batch_bytes: int = BATCH_BYTES) -> None:
        self.path, self.seq_len, self.dtype, self.split = path, seq_len, dtype, split
        self.tmp = temp_path(path)
        self.batch_rows = max(1, -(-batch_bytes // (seq_len * dtype.itemsize)))
        # Readers map a row to its batch by arithmetic: every batch but the last has batch_rows rows.
        self.schema = pa.schema([("input_ids", pa.list_(pa.from_numpy_dtype(dtype), seq_len))],
                                metadata={"batch_rows": str(self.batch_rows)})
        self.rows = 0
        self._pending: list[np.ndarray] = []
        self._ends: list[int] = []  # file offset after each batch's IPC message: the next one starts there
        self._sink = pa.OSFile(str(self.tmp), "wb")
        self._writer = pa.ipc.new_file(self._sink, self.schema, options=pa.ipc.IpcWriteOptions(compression="zstd"))

    def write(self, rows: np.ndarray) -> None:
        """rows: (n, seq_len) array of token ids."""
        self._pending.append(as_token_ids(rows, self.dtype, str(self.path)))
        if sum(len(r) for r in self._pending) >= self.batch_rows:
            rows = np.concatenate(self._pending)
            whole = len(rows) - len(rows) % self.batch_rows
            for start in range(0, whole, self.batch_rows):
                self._write_batch(rows[start:start + self.batch_rows])
            self._pending = [rows[whole:]]

    def _write_batch(self, rows: np.ndarray) -> None:
        flat = pa.array(rows.reshape(-1), type=pa.from_numpy_dtype(self.dtype))
        self._writer.write_batch(pa.record_batch([pa.FixedSizeListArray.from_arrays(flat, self.seq_len)],
                                                 schema=self.schema))
        self._ends.append(self._sink.tell())  # the writer writes through to the file: no buffer in between
        self.rows += len(rows)

    def _batch_table(self, data: pa.Buffer) -> np.ndarray:
        """The table of what was written, hashed from the file's bytes. The first batch starts after the schema
        message, which the writer writes with the first batch (so tell() before it would still say 0)."""
        head = pa.BufferReader(data)
        head.seek(8)
        pa.ipc.read_message(head)
        starts = [head.tell(), *self._ends[:-1]]
        table = np.zeros(len(starts), BATCH_TABLE)
        for i, (start, end) in enumerate(zip(starts, self._ends, strict=True)):
            message = data.slice(start, end - start)
            if end - start >= 1 << 32 or pa.ipc.read_message(message).type != "record batch":
                raise AssertionError(f"{self.tmp}: batch {i} is not one IPC message at [{start}, {end})")
            table[i] = (start, end - start, int(xxh3_bytes(message), 16))
        return table

    def close(self) -> ShardInfo:
        """Finish the file and publish it with its table file (the table first: a shard on disk has its table);
        the ShardInfo holds its size, sha256 and the hashes of its table's blocks."""
        if self._pending and (rest := np.concatenate(self._pending)).size:
            self._write_batch(rest)
        self._writer.close()
        self._sink.close()
        with pa.memory_map(str(self.tmp), "r") as source:  # one read of the new file for both hashes
            data = source.read_buffer()
            table, sha256 = self._batch_table(data), hashlib.sha256(memoryview(data)).hexdigest()
            size = data.size
        if len(table):
            publish_bytes(self.path.with_name(table_name(self.path.name)), table.tobytes())
        commit_file(self.tmp, self.path)
        return ShardInfo(path=self.path.name, split=self.split, rows=self.rows, tokens=self.rows * self.seq_len,
                         bytes=size, sha256=sha256, table=tables.encode(tables.block_hashes(table), "<u8"),
                         table_bytes=table.nbytes, batch_rows=self.batch_rows, dtype=self.dtype.name)
