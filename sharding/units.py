"""The map's units of work: input files, each large JSONL or Parquet file split into pieces of ~shard.split_mb.

One 50 GB file would otherwise be one map element's hours of work, lost whole at a time-out, while the other
elements sit idle. A piece k of n covers the nominal byte range [k x S, (k+1) x S) of its file (S = split_mb):
- JSONL: the lines that *start* in the range. Its reader seeks to the range, skips to the next line start and
  stops at the first line starting past it, so it reads about S bytes, and every line is in exactly one piece.
- Parquet: row groups floor(k x G / n) up to floor((k+1) x G / n) of the file's G, read from its footer.
- `.jsonl.zst` (no seek table), plain text (one document) and files no larger than S stay one unit.

Units are numbered in input order, a file's pieces in order, so the global document order is unchanged. The
plan is a pure function of the recorded input sizes and split_mb: the launcher, every map element and the
reduce compute the same units without reading any file. The kept documents are the same with or without
splitting (tests/unit/test_units.py); the shards differ only where packing groups start (at unit boundaries).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sharding.readers import Piece, splittable

MB = 1_000_000


@dataclass(frozen=True)
class Unit:
    file: int  # index of the input file in the recorded list
    piece: Piece  # which part of the file (the whole file when piece.count == 1)

    @property
    def size(self) -> int:
        return self.piece.stop - self.piece.start


def split_bytes(split_mb: float) -> int:
    """shard.split_mb in bytes; 0 never splits."""
    return int(split_mb * MB)


def plan_units(recorded: Sequence[dict[str, Any]], split_mb: float) -> list[Unit]:
    """The units of the recorded inputs ({path, size, ...} each, in order)."""
    limit = split_bytes(split_mb)
    units = []
    for index, entry in enumerate(recorded):
        size = int(entry["size"])
        pieces = -(-size // limit) if limit and size > limit and splittable(entry["path"]) else 1
        step = limit if pieces > 1 else max(size, 1)
        units += [Unit(index, Piece(k, pieces, k * step, size if k == pieces - 1 else (k + 1) * step))
                  for k in range(pieces)]
    return units


def unit_source(entry: dict[str, Any], piece: Piece) -> dict[str, Any]:
    """What a unit's tally records as its source: its input file's recorded entry, with the piece when the file is
    split (a whole file's source is its entry alone, as before splitting existed)."""
    return {**entry, "piece": [piece.index, piece.count]} if piece.count > 1 else dict(entry)
