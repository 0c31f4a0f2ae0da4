"""Pack the kept documents of every work file, in global order, into train and val shards."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from sharding.config import ShardConfig
from sharding.dedup import DedupIndex
from sharding.shards import Manifest, ShardInfo, ShardWriter, as_token_ids, token_dtype
from sharding.tokenize import Packer, TokenizerInfo

SPLITS = ("train", "val")


class _Rotation:
    """Writes rows of one split into shard files of exactly `per_shard` rows (the last may be shorter)."""

    def __init__(self, out: Path, split: str, seq_len: int, dtype: np.dtype[Any], per_shard: int) -> None:
        self.out, self.split, self.seq_len, self.dtype, self.per_shard = out, split, seq_len, dtype, per_shard
        self.done: list[ShardInfo] = []
        self.writer: ShardWriter | None = None
        self.in_shard = 0

    def write(self, rows: np.ndarray) -> None:
        while len(rows):
            if self.writer is None:
                path = self.out / f"{self.split}-{len(self.done):05d}.arrow"
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


def pack_and_write(cfg: ShardConfig, out: Path, current: DedupIndex, keep: np.ndarray, info: TokenizerInfo,
                   data_hash: str, token_paths: Sequence[Path]) -> tuple[Manifest, dict[str, dict[str, int]]]:
    """Rows of `current` are in the order of `token_paths` and their records; `keep` selects the survivors."""
    dtype = token_dtype(info.id_bound)
    packers = {s: Packer(cfg.seq_len, info.eos_id, dtype) for s in SPLITS}
    shards = {s: _Rotation(out, s, cfg.seq_len, dtype, cfg.shard_sequences) for s in SPLITS}
    counts = {s: {"docs": 0, "doc_tokens": 0} for s in SPLITS}
    row = 0
    for path in token_paths:
        if not path.exists():
            continue
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
        for b in range(reader.num_record_batches):
            column = reader.get_batch(b).column("tokens")
            # Converted (and range-checked) once per batch: the packer then gets slices already in the shard dtype.
            offsets, values = column.offsets.to_numpy(), as_token_ids(column.values.to_numpy(), dtype, str(path))
            for j in range(len(column)):
                if keep[row]:
                    split = "val" if current.val[row] else "train"
                    doc = values[offsets[j]:offsets[j + 1]]
                    counts[split]["docs"] += 1
                    counts[split]["doc_tokens"] += len(doc)
                    shards[split].write(packers[split].add(doc))
                row += 1
    if row != len(current):
        raise AssertionError(f"work files hold {row} documents but their dedup columns {len(current)}")
    infos = tuple(info for s in SPLITS for info in shards[s].close())
    tokens = {s: {**counts[s], "packed_tokens": sum(i.tokens for i in infos if i.split == s),
                  "tail_dropped_tokens": packers[s].tail_tokens} for s in SPLITS}
    manifest = Manifest(seq_len=cfg.seq_len, dtype=dtype.name, tokenizer_sha256=info.sha256,
                        tokenizer_path=info.path, eos_id=info.eos_id, config_sha256=data_hash, shards=infos,
                        extra={"docs": {s: counts[s]["docs"] for s in SPLITS},
                               "previous_rounds": list(cfg.dedup.previous)})
    return manifest, tokens
