"""The shard format, in one place: zstd Arrow IPC files of packed token sequences, and the manifest.

A shard is an Arrow IPC *file* (random access by record batch; memory-map it and only the batch
you read is decompressed) with one column, `input_ids: fixed_size_list<uint16|uint32>[seq_len]`,
one row per packed sequence, in record batches of at least ~1 MB. `manifest.json` beside the
shards records, per shard, its split, rows, tokens, bytes and sha256, and for the whole set the
tokenizer fingerprint, seq_len, dtype and the config hash that produced it.

Format 2 adds per shard a table of its record batches: where each batch's IPC message lies in the
file (offset, length) and the XXH3-64 of those stored, compressed bytes. Arrow's zstd buffers carry
no checksum, so without it a flipped bit decodes into other tokens or an opaque zstd error; the
reader hashes a batch's bytes before decoding them and decodes exactly the bytes it hashed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa

from common.checksum import xxh3_bytes, xxh3_int
from common.publish import commit_file, publish_json, temp_path

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)  # format 1 has no batch tables: only sizes (and sha256 on request) can be checked
MANIFEST = "manifest.json"
BATCH_BYTES = 1 << 20  # record batches of at least this many bytes before compression
IPC_MAGIC = b"ARROW1"  # an IPC file starts with these 6 bytes and 2 of padding, then the schema message
# One entry per record batch, packed little-endian: 20 bytes, 27 characters of base64 in manifest.json. A batch holds
# at least BATCH_BYTES of tokens, so the table costs at most ~27 bytes of manifest per MiB of tokens (0.003%): about
# 27 MB of JSON for a TiB of token bytes (a million batches). Readers decode only the tables of shards they open.
BATCH_TABLE = np.dtype([("offset", "<u8"), ("length", "<u4"), ("xxh3", "<u8")])


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


def encode_batch_table(table: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(table, dtype=BATCH_TABLE).tobytes()).decode("ascii")


def decode_batch_table(text: str, where: str) -> np.ndarray:
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error as e:
        raise ManifestError(f"{where}: its batch table is not base64 ({e})") from None
    if len(raw) % BATCH_TABLE.itemsize:
        raise ManifestError(f"{where}: its batch table has {len(raw)} bytes, not a multiple of {BATCH_TABLE.itemsize}")
    return np.frombuffer(raw, BATCH_TABLE)


def _table_entries(table: np.ndarray) -> list[tuple[int, int, int]]:
    """The table as plain (offset, length, xxh3) ints: numpy scalar access costs microseconds a field."""
    return list(zip(table["offset"].tolist(), table["length"].tolist(), table["xxh3"].tolist(), strict=True))


def _stored_batch(data: pa.Buffer, entry: tuple[int, int, int]) -> pa.Buffer | None:
    """The batch's stored bytes if they are the ones its table entry records, else None."""
    offset, length, expected = entry
    stored = data.slice(offset, length)
    return stored if offset + length <= data.size and xxh3_int(stored) == expected else None


def damaged_batches(path: Path, table: np.ndarray) -> list[int]:
    """Indices of the record batches of `path` whose stored bytes differ from `table` (or lie past its end)."""
    with pa.memory_map(str(path), "r") as source:
        data = source.read_buffer()
        return [i for i, entry in enumerate(_table_entries(table)) if _stored_batch(data, entry) is None]


@dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the manifest's folder
    split: str  # "train" or "val"
    rows: int  # packed sequences
    tokens: int  # rows * seq_len
    bytes: int  # file size
    sha256: str
    batches: str = ""  # base64 of the BATCH_TABLE of its record batches; "" (format 1): reads are not checked

    def batch_table(self) -> np.ndarray | None:
        return decode_batch_table(self.batches, self.path) if self.batches else None


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
            if not shard["batches"]:
                del shard["batches"]
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
        named = [s.path for s in shards] + ([manifest.dedup_index.path] if manifest.dedup_index else [])
        if bad := next((p for p in named if _outside(root, p)), None):
            raise ManifestError(f"{path}: file path {bad!r} is not inside the folder; refused")
        return manifest

    def verify(self, folder: Path, full: bool = True) -> list[str]:
        """Problems found, one line each (empty: all good). `full` re-hashes every shard; a shard whose sha256
        differs is searched for damaged record batches. The dedup index: `sharding.dedup_index.index_problems`."""
        problems = []
        for shard in self.shards:
            problem = FileInfo(shard.path, shard.bytes, shard.sha256).problem(folder, full=False)
            if problem is None and full and sha256_file(Path(folder) / shard.path) != shard.sha256:
                problem = f"{shard.path}: sha256 differs from the manifest (corrupt or changed)"
                if (table := shard.batch_table()) is not None:
                    bad = damaged_batches(Path(folder) / shard.path, table)
                    problem += (f"; damaged record batches: {', '.join(map(str, bad))} of {len(table)}" if bad else
                                f"; its {len(table)} record batches are intact: the damage is in its schema or footer")
            if problem is not None:
                problems.append(problem)
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
        self._ends: list[int] = []  # file offset after each batch's IPC message: the next one starts there
        self._sink = pa.OSFile(str(self.tmp), "wb")
        self._writer = pa.ipc.new_file(self._sink, self.schema, options=pa.ipc.IpcWriteOptions(compression="zstd"))

    def write(self, rows: np.ndarray) -> None:
        """rows: (n, seq_len) array of token ids."""
        self._pending.append(as_token_ids(rows, self.dtype, str(self.path)))
        while sum(len(r) for r in self._pending) >= self.batch_rows:
            rows = np.concatenate(self._pending)
            self._pending = [rows[self.batch_rows:]]
            self._write_batch(rows[: self.batch_rows])

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
        """Finish the file and publish it; the ShardInfo holds its size, sha256 and batch table."""
        if self._pending and (rest := np.concatenate(self._pending)).size:
            self._write_batch(rest)
        self._writer.close()
        self._sink.close()
        with pa.memory_map(str(self.tmp), "r") as source:  # one read of the new file for both hashes
            data = source.read_buffer()
            table, sha256 = self._batch_table(data), hashlib.sha256(memoryview(data)).hexdigest()
            size = data.size
        commit_file(self.tmp, self.path)
        return ShardInfo(path=self.path.name, split=self.split, rows=self.rows, tokens=self.rows * self.seq_len,
                         bytes=size, sha256=sha256, batches=encode_batch_table(table))


class ShardReader:
    """Random access to one shard's rows through a memory map: only the batches read are decompressed.

    With the shard's batch table (format 2), every batch decoded is first hashed and compared with its entry, and
    decoded from exactly those bytes; the footer is not read, so a damaged one cannot point the reader elsewhere.
    A mismatch raises ShardCorrupt. Without a table, batches are found through the footer and not checked.
    """

    def __init__(self, path: Path, table: np.ndarray | None = None) -> None:
        self.path, self._table = Path(path), table
        self._entries = _table_entries(table) if table is not None else []  # looked up once per decode
        self._source = pa.memory_map(str(self.path), "r")
        self._reader: pa.ipc.RecordBatchFileReader | None = None
        try:
            self.schema, self._batches = self._open()
            self._batch_rows = int(self.schema.metadata[b"batch_rows"])
            self.seq_len = self.schema.field("input_ids").type.list_size
            self.dtype = np.dtype(self.schema.field("input_ids").type.value_type.to_pandas_dtype())
            last = self._batches - 1
            self.rows = self._batch_rows * last + len(self._decode(last)) if self._batches else 0
        except BaseException:
            self._source.close()
            raise

    def _open(self) -> tuple[pa.Schema, int]:
        """(schema, batches): from the footer without a table, else the schema message after the magic."""
        try:
            if self._table is None:
                self._reader = pa.ipc.open_file(self._source)
                return self._reader.schema, self._reader.num_record_batches
            self._data = self._source.read_buffer()
            if self._data.size < 8 or self._data.slice(0, 6).to_pybytes() != IPC_MAGIC:
                raise ShardCorrupt(self._corrupt("does not start as an Arrow IPC file"))
            head = pa.BufferReader(self._data)
            head.seek(8)
            return pa.ipc.read_schema(pa.ipc.read_message(head)), len(self._table)
        except pa.ArrowException as e:
            raise ShardCorrupt(self._corrupt(f"is unreadable ({str(e).splitlines()[0]})")) from None

    def _corrupt(self, what: str) -> str:
        return f"{self.path} {what}; run `stillroom inspect --verify {self.path.parent}` to find what is damaged"

    def __len__(self) -> int:
        return self.rows

    def _decode(self, index: int) -> np.ndarray:
        if not 0 <= index < self._batches:
            raise IndexError(f"batch {index} out of range for {self.path} with {self._batches} batches")
        try:
            if self._table is None:
                assert self._reader is not None
                batch = self._reader.get_batch(index)
            else:
                if (stored := _stored_batch(self._data, self._entries[index])) is None:
                    raise ShardCorrupt(self._corrupt(f"record batch {index} of {self._batches} is damaged (the "
                                                     "XXH3 of its stored bytes differs from the manifest's)"))
                message = pa.ipc.read_message(stored)
                batch = pa.ipc.read_record_batch(message, self.schema)
            return batch.column(0).flatten().to_numpy().reshape(-1, self.seq_len)
        except pa.ArrowException as e:  # intact bytes that do not decode: written wrong, or a table of another file
            raise ShardCorrupt(self._corrupt(f"record batch {index} does not decode ({str(e).splitlines()[0]})")) \
                from None

    def batch(self, index: int) -> np.ndarray:
        return self._decode(index)

    def row(self, i: int) -> np.ndarray:
        if not 0 <= i < self.rows:
            raise IndexError(f"row {i} out of range for {self.path} with {self.rows} rows")
        b, offset = divmod(i, self._batch_rows)
        return self.batch(b)[offset]

    def __iter__(self) -> Iterator[np.ndarray]:
        for b in range(self._batches):
            yield from self.batch(b)

    def close(self) -> None:
        self._source.close()
