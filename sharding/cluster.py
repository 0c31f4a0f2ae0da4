"""The cluster step: duplicate pairs from every bucket -> which documents are dropped, and why.

Exact pairs already point at the earliest document with the same text. Near pairs are joined into connected
components by union-find over the pairs alone (memory: pairs, not documents), and each component's earliest
document survives: what `minhash.duplicate_of` does in one process, for any bucket count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from sharding.buckets import KeySpace
from sharding.documents import SAMPLES_PER_REASON, Tally
from sharding.minhash import _components

REASONS = ("dedup.exact", "dedup.exact_previous_round", "dedup.near", "dedup.near_previous_round")


def cluster(exact: np.ndarray, near: np.ndarray, base: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(key, rep, reason) of every dropped document of this round, sorted by key; reason indexes REASONS."""
    keys = [exact["hi"]]
    reps = [exact["lo"]]
    kinds = [np.zeros(len(exact), np.uint8)]
    if len(near):
        nodes, inverse = np.unique(np.concatenate([near["lo"], near["hi"]]), return_inverse=True)
        root = _components(len(nodes), inverse[: len(near)], inverse[len(near):])
        moved = (root != np.arange(len(nodes))) & (nodes >= np.uint64(base))
        keys.append(nodes[moved])
        reps.append(nodes[root[moved]])
        kinds.append(np.full(int(moved.sum()), 2, np.uint8))
    key, rep, kind = np.concatenate(keys), np.concatenate(reps), np.concatenate(kinds)
    if len(np.unique(key)) != len(key):
        raise AssertionError("a document is both an exact and a near duplicate: buckets disagree")
    kind += (rep < np.uint64(base)).astype(np.uint8)  # *_previous_round: its original is an earlier round's
    order = np.argsort(key)
    return key[order], rep[order], kind[order]


def unit_drops(keys: np.ndarray, space: KeySpace, unit: int) -> np.ndarray:
    """Rows of `unit` in the sorted drop list (a memory map: only the unit's slice is read)."""
    lo, hi = np.searchsorted(keys, [space.offset(unit), space.offset(unit + 1)])
    return space.row_of(np.asarray(keys[lo:hi]))


def _record(tokens: Path, row: int) -> int:
    """The input record of a row of a unit's tokens file."""
    reader = pa.ipc.open_file(pa.memory_map(str(tokens)))
    for b in range(reader.num_record_batches):
        records = reader.get_batch(b).column("record")
        if row < len(records):
            return int(records[row].as_py())
        row -= len(records)
    raise IndexError(f"{tokens} has no row {row}")


def dedup_tally(drops: np.ndarray, space: KeySpace, where: Callable[[int, int], str],
                tokens: Callable[[int], Path]) -> Tally:
    """The drops counted by reason, with the first few located like every other drop reason: `where(unit,
    record)` names a record of a unit, `tokens(unit)` is the unit's tokens file."""
    tally = Tally()
    for code, reason in enumerate(REASONS):
        mine = drops[drops["reason"] == code]
        tally.dropped[reason] += len(mine)
        if not len(mine):
            continue
        examples = tally.samples.setdefault(reason, [])
        for entry in mine[:SAMPLES_PER_REASON]:
            unit, row = int(space.unit_of(entry["key"])), int(space.row_of(entry["key"]))
            at = where(unit, _record(tokens(unit), row))
            if code % 2:
                original = "an earlier round"
            else:
                rep_unit, rep_row = int(space.unit_of(entry["rep"])), int(space.row_of(entry["rep"]))
                original = where(rep_unit, _record(tokens(rep_unit), rep_row))
            examples.append(f"{at}: duplicate of {original}")
    tally.dropped = +tally.dropped  # no zero counts: the summary lists reasons that happened
    return tally


def pack_groups(unit_tokens: Sequence[int], target: int) -> list[list[int]]:
    """Consecutive map units in groups of at least `target` tokens (the last may hold fewer): a function of
    the map's output alone, so packing, and the shards, do not depend on the number of tasks."""
    groups: list[list[int]] = [[]]
    held = 0
    for unit, count in enumerate(unit_tokens):
        if held >= target:
            groups.append([])
            held = 0
        groups[-1].append(unit)
        held += count
    return groups
