"""Pack the kept documents of one packing group (consecutive input files), in global order, into train and val
shards named by the group: packing groups are made from the map's token counts alone, so the shards are the same
for any number of pack tasks."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from sharding.config import ShardConfig
from sharding.shards import ShardInfo, ShardWriter, as_token_ids
from sharding.tokenize import Packer

SPLITS = ("train", "val")


class _Rotation:
    """Writes rows of one split into shard files of exactly `per_shard` rows (the last may be shorter)."""

    def __init__(self, out: Path, prefix: str, split: str, seq_len: int, dtype: np.dtype[Any], per_shard: int) -> None:
        self.out, self.prefix, self.split, self.seq_len = out, prefix, split, seq_len
        self.dtype, self.per_shard = dtype, per_shard
        self.done: list[ShardInfo] = []
        self.writer: ShardWriter | None = None
        self.in_shard = 0

    def write(self, rows: np.ndarray) -> None:
        while len(rows):
            if self.writer is None:
                path = self.out / f"{self.split}-{self.prefix}-{len(self.done):05d}.arrow"
                self.writer, self.in_shard = ShardWriter(path, self.seq_len, self.dtype, self.split), 0
            take = min(len(rows), self.per_shard - self.in_shard)
            self.writer.write(rows[:take])
            self.in_shard += take
            rows = rows[take:]
            if self.in_shard == self.per_shard:
                self.done.append(self.writer.close())
                self.writer = None

    def close(self) -> list[ShardInfo]:
        if self.writer is not None:
            self.done.append(self.writer.close())
            self.writer = None
        return self.done


def pack_group(cfg: ShardConfig, out: Path, group: int, units: Sequence[tuple[Path, np.ndarray]], eos_id: int,
               dtype: np.dtype[Any]) -> dict[str, Any]:
    """units: (tokens work file, keep mask over its rows) in order. Returns the group's shards and counts."""
    packers = {s: Packer(cfg.seq_len, eos_id, dtype) for s in SPLITS}
    shards = {s: _Rotation(out, f"{group:05d}", s, cfg.seq_len, dtype, cfg.shard_sequences) for s in SPLITS}
    counts = {s: {"docs": 0, "doc_tokens": 0} for s in SPLITS}
    for path, keep in units:
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
        row = 0
        for b in range(reader.num_record_batches):
            batch = reader.get_batch(b)
            column, val = batch.column("tokens"), batch.column("val").to_numpy(zero_copy_only=False)
            # Converted (and range-checked) once per batch: the packer then gets slices already in the shard dtype.
            offsets, values = column.offsets.to_numpy(), as_token_ids(column.values.to_numpy(), dtype, str(path))
            for j in np.flatnonzero(keep[row:row + len(column)]):
                split = "val" if val[j] else "train"
                doc = values[offsets[j]:offsets[j + 1]]
                counts[split]["docs"] += 1
                counts[split]["doc_tokens"] += len(doc)
                shards[split].write(packers[split].add(doc))
            row += len(column)
        if row != len(keep):
            raise AssertionError(f"{path} holds {row} documents but its dedup files {len(keep)}")
    infos = [info for s in SPLITS for info in shards[s].close()]
    return {"shards": [dataclasses.asdict(i) for i in infos],
            "tokens": {s: {**counts[s], "packed_tokens": sum(i.tokens for i in infos if i.split == s),
                           "tail_dropped_tokens": packers[s].tail_tokens} for s in SPLITS}}
