"""Reading one shard (the format: sharding/shards.py): random access to its rows, every batch checked against the
shard's batch table before it is decoded."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from common.checksum import xxh3_int
from sharding.batch_table import BatchTable, TableError
from sharding.shards import IPC_MAGIC, ShardCorrupt, ShardInfo


@dataclass(frozen=True)
class Layout:
    """What a reader needs to decode a shard's batches, as the manifest records it: with it, opening a shard reads
    nothing of the file (at thousands of shards nearly every random row opens one, and the schema is the same)."""

    seq_len: int
    dtype: np.dtype[Any]
    batch_rows: int

    def schema(self) -> pa.Schema:
        return pa.schema([("input_ids", pa.list_(pa.from_numpy_dtype(self.dtype), self.seq_len))])


class ShardReader:
    """Random access to one shard's rows: only the batches read are read and decompressed.

    With the shard's batch table (formats 2 and 3), each batch is read with one pread of exactly its stored bytes
    (no memory map: a page fault reads ahead ~100 KiB on a cold cache, 25x a 4 KiB row), hashed and compared with
    its entry, and decoded from exactly those bytes; the footer is not read, so a damaged one cannot point the
    reader elsewhere, and every batch decoded must hold the rows the table and `rows` (the manifest's count) make it
    hold. A mismatch raises ShardCorrupt. Given the `layout` too, opening reads nothing; without it, the schema.
    Without a table (format 1), batches are found through the footer of a memory map and not checked.
    """

    def __init__(self, path: Path, table: BatchTable | None = None, rows: int | None = None,
                 layout: Layout | None = None) -> None:
        self.path, self._table = Path(path), table
        self._source: pa.MemoryMappedFile | None = None
        self._reader: pa.ipc.RecordBatchFileReader | None = None
        self._fd = -1
        try:
            if table is None:
                self._source = pa.memory_map(str(self.path), "r")
                self._reader = self._arrow(lambda: pa.ipc.open_file(self._source), "is unreadable")
                self.schema, self._batches = self._reader.schema, self._reader.num_record_batches
            else:
                self._fd = os.open(self.path, os.O_RDONLY)
                self.schema, self._batches = layout.schema() if layout else self._read_schema(), len(table)
            self.batch_rows = layout.batch_rows if layout else self._batch_rows()
            self.seq_len = self.schema.field("input_ids").type.list_size
            self.dtype = np.dtype(self.schema.field("input_ids").type.value_type.to_pandas_dtype())
            if rows is None:
                last = self._batches - 1
                rows = self.batch_rows * last + len(self._decode(last)) if self._batches else 0
            elif self._batches != -(-rows // self.batch_rows):
                raise ShardCorrupt(self._corrupt(f"has {self._batches} record batches of {self.batch_rows} rows, "
                                                 f"which cannot hold the {rows} rows of the manifest"))
            self.rows = rows
        except BaseException:
            self.close()
            raise

    def _arrow(self, call: Any, what: str) -> Any:
        try:
            return call()
        except pa.ArrowException as e:
            raise ShardCorrupt(self._corrupt(f"{what} ({str(e).splitlines()[0]})")) from None

    def _read_schema(self) -> pa.Schema:
        """The schema message after the magic: 8 bytes, then a continuation marker and the message's length."""
        head = os.pread(self._fd, 16, 0)
        if len(head) < 16 or head[:6] != IPC_MAGIC or head[8:12] != b"\xff\xff\xff\xff":
            raise ShardCorrupt(self._corrupt("does not start as an Arrow IPC file"))
        message = os.pread(self._fd, 8 + int.from_bytes(head[12:16], "little", signed=True), 8)
        return self._arrow(lambda: pa.ipc.read_schema(pa.ipc.read_message(pa.py_buffer(message))), "is unreadable")

    def _batch_rows(self) -> int:
        """Rows per record batch, from the schema's metadata (the writer records it)."""
        try:
            rows = int((self.schema.metadata or {})[b"batch_rows"])
        except (KeyError, ValueError):
            rows = 0
        if rows < 1:
            raise ShardCorrupt(self._corrupt("has no valid batch_rows in its schema's metadata"))
        return rows

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
                offset, length, digest = self._table.entry(index)
                stored = os.pread(self._fd, length, offset)
                if len(stored) != length or xxh3_int(stored) != digest:
                    raise ShardCorrupt(self._corrupt(f"record batch {index} of {self._batches} is damaged (the "
                                                     "XXH3 of its stored bytes differs from the manifest's)"))
                batch = pa.ipc.read_record_batch(pa.ipc.read_message(pa.py_buffer(stored)), self.schema)
            return batch.column(0).flatten().to_numpy().reshape(-1, self.seq_len)
        except TableError as e:
            raise ShardCorrupt(f"{e}; run `stillroom inspect --verify {self.path.parent}`") from None
        except pa.ArrowException as e:  # intact bytes that do not decode: written wrong, or a table of another file
            raise ShardCorrupt(self._corrupt(f"record batch {index} does not decode ({str(e).splitlines()[0]})")) \
                from None

    def batch(self, index: int) -> np.ndarray:
        rows = self._decode(index)
        if len(rows) != min(self.batch_rows, self.rows - index * self.batch_rows):
            raise ShardCorrupt(self._corrupt(f"record batch {index} holds {len(rows)} rows, not the "
                                             f"{min(self.batch_rows, self.rows - index * self.batch_rows)} its "
                                             "place in the file and the manifest's row count make it hold"))
        return rows

    def row(self, i: int) -> np.ndarray:
        if not 0 <= i < self.rows:
            raise IndexError(f"row {i} out of range for {self.path} with {self.rows} rows")
        b, offset = divmod(i, self.batch_rows)
        return self.batch(b)[offset]

    def __iter__(self) -> Iterator[np.ndarray]:
        for b in range(self._batches):
            yield from self.batch(b)

    def close(self) -> None:
        if self._source is not None:
            self._source.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def open_shard(folder: Path, info: ShardInfo, seq_len: int) -> ShardReader:
    """A reader of one shard of a manifest (of rows of `seq_len` values), checked as training reads it."""
    layout = Layout(seq_len, np.dtype(info.dtype), info.batch_rows) if info.batch_rows and info.dtype else None
    return ShardReader(Path(folder) / info.path, info.batch_table(folder), info.rows, layout)
