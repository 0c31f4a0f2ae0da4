"""A shard's table of record batches: where each batch's IPC message lies in the file and the XXH3-64 of its stored
(compressed) bytes. Arrow's zstd buffers carry no checksum, so without it a flipped bit decodes into other tokens or
an opaque zstd error; the reader hashes a batch's bytes before decoding them and decodes exactly the bytes it hashed.

Format 2 kept the table inline in manifest.json (base64). Format 3 keeps it in a file beside the shard,
`<stem>.batches`, and the manifest only the XXH3-64 of each block of BLOCK entries of it: record batches are small
(16 KiB of tokens, so that a random row decodes few others), a terabyte of tokens has tens of millions of them, and
an inline table would make a manifest of a gigabyte that every rank parses. A reader reads and checks only the
block holding the entry it needs: a random row costs one 2.5 KiB read of the table, not the shard's whole table.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa

from common.checksum import xxh3_int

# One entry per record batch, packed little-endian: 20 bytes.
BATCH_TABLE = np.dtype([("offset", "<u8"), ("length", "<u4"), ("xxh3", "<u8")])
# Entries per checked block of a table file: 2,560 bytes read per block; 8 bytes of hash (11 of base64) in the
# manifest per 128 batches, i.e. per 2 MiB of tokens: ~5 MB of manifest for a terabyte of token bytes.
BLOCK = 128
SUFFIX = ".batches"


class TableError(ValueError):
    """A batch table that is not the one the manifest recorded (raised as ShardCorrupt by sharding.shards)."""


def table_name(shard_path: str) -> str:
    """The table file of a shard, beside it: `train-00000-00001.arrow` -> `train-00000-00001.batches`."""
    return str(PurePosixPath(shard_path).with_suffix(SUFFIX))


def block_hashes(table: np.ndarray) -> np.ndarray:
    """The XXH3-64 of each BLOCK entries of `table`, as stored (the manifest keeps their base64)."""
    raw = np.ascontiguousarray(table, dtype=BATCH_TABLE)
    return np.array([xxh3_int(raw[i:i + BLOCK]) for i in range(0, len(raw), BLOCK)], "<u8")


def encode(values: np.ndarray, dtype: np.dtype | str) -> str:
    return base64.b64encode(np.ascontiguousarray(values, dtype=dtype).tobytes()).decode("ascii")


def decode(text: str, dtype: np.dtype | str, where: str) -> np.ndarray:
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error as e:
        raise TableError(f"{where}: its batch table is not base64 ({e})") from None
    if len(raw) % np.dtype(dtype).itemsize:
        raise TableError(f"{where}: its batch table has {len(raw)} bytes, not a multiple of "
                         f"{np.dtype(dtype).itemsize}")
    return np.frombuffer(raw, dtype)


class BatchTable:
    """Entry i of a shard's table, checked before use: inline (format 2, checked with the manifest) or read from the
    table file one block at a time, each block checked against its hash in the manifest when first read."""

    def __init__(self, count: int, entries: np.ndarray | None = None, path: Path | None = None,
                 blocks: np.ndarray | None = None) -> None:
        self.count, self.path, self._blocks = count, path, blocks
        self._read: dict[int, np.ndarray] = {} if entries is None else {b: entries[b * BLOCK:(b + 1) * BLOCK]
                                                                       for b in range(-(-count // BLOCK))}
        self.bytes_read = 0  # of the table file, over the reader's life (what the loader benchmark counts)

    @classmethod
    def from_file(cls, path: Path, size: int, blocks: np.ndarray) -> BatchTable:
        count, rest = divmod(size, BATCH_TABLE.itemsize)
        if rest or len(blocks) != -(-count // BLOCK):
            raise TableError(f"{path.name}: the manifest records {size} bytes and {len(blocks)} block hashes, which "
                             f"do not describe one table of {BATCH_TABLE.itemsize}-byte entries in blocks of {BLOCK}")
        return cls(count, path=path, blocks=blocks)

    def __len__(self) -> int:
        return self.count

    def _block(self, b: int) -> np.ndarray:
        if (block := self._read.get(b)) is None:
            self._load(b, b + 1)
            block = self._read[b]
        return block

    def _load(self, first: int, end: int) -> None:
        """Blocks [first, end) read with one pread and each checked against its hash in the manifest."""
        assert self.path is not None and self._blocks is not None
        size = BATCH_TABLE.itemsize
        want = (min(end * BLOCK, self.count) - first * BLOCK) * size
        try:
            fd = os.open(self.path, os.O_RDONLY)
            try:  # a block anywhere in the table: read-ahead would fetch blocks no one asked for
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                raw = os.pread(fd, want, first * BLOCK * size)
            finally:
                os.close(fd)
        except OSError as e:
            raise TableError(f"{self.path}: unreadable ({e.strerror})") from None
        self.bytes_read += len(raw)
        for b in range(first, end):
            part = raw[(b - first) * BLOCK * size:(b - first + 1) * BLOCK * size]
            if len(part) != (min((b + 1) * BLOCK, self.count) - b * BLOCK) * size or \
                    xxh3_int(part) != int(self._blocks[b]):
                raise TableError(f"{self.path}: block {b} of its batch table differs from the manifest's XXH3 "
                                 "(damaged, truncated or of another shard)")
            self._read[b] = np.frombuffer(part, BATCH_TABLE)

    def entry(self, i: int) -> tuple[int, int, int]:
        """(offset, length, xxh3) of batch i as plain ints."""
        offset, length, digest = self._block(i // BLOCK)[i % BLOCK].item()
        return offset, length, digest

    def entries(self) -> np.ndarray:
        """The whole table, every block checked (for `inspect --verify`): one read of the file."""
        blocks = -(-self.count // BLOCK)
        if not blocks:
            return np.zeros(0, BATCH_TABLE)
        if len(self._read) < blocks:
            self._load(0, blocks)
        return np.concatenate([self._read[b] for b in range(blocks)])


def stored_batch(data: pa.Buffer, entry: tuple[int, int, int]) -> pa.Buffer | None:
    """The batch's stored bytes if they are the ones its table entry records, else None."""
    offset, length, expected = entry
    stored = data.slice(offset, length)
    return stored if offset + length <= data.size and xxh3_int(stored) == expected else None


def damaged_batches(path: Path, table: BatchTable) -> list[int]:
    """Indices of the record batches of `path` whose stored bytes differ from `table` (or lie past its end)."""
    with pa.memory_map(str(path), "r") as source:
        data = source.read_buffer()
        return [i for i, entry in enumerate(table.entries().tolist()) if stored_batch(data, entry) is None]
