"""Deduplication in one process over arrays in memory: the reference the bucketed stage (`sharding.buckets`,
`sharding.cluster`) must agree with, document for document, and a quick way to dedup a list of texts.

Rows are in global document order (earlier rounds first), and a duplicate always points at the earliest document
of its group: exact duplicates (equal `exact_hash`) first, then near duplicates (MinHash LSH) among the rest.
The stage gives the same verdict for any number of map tasks and buckets (tests/unit/test_bucketed_dedup.py).
Memory here is ~2 KB per document, which is why the stage does not use it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from sharding.config import DedupConfig
from sharding.minhash import MinHasher, duplicate_of, exact_duplicate_of, exact_hash


@dataclass
class Rows:
    exact: np.ndarray  # (n,) "V16" hashes of the cleaned texts ("S16" would drop trailing zero bytes)
    sigs: np.ndarray  # (n, num_perm) uint32 MinHash signatures

    def __len__(self) -> int:
        return len(self.exact)

    @classmethod
    def of(cls, texts: Sequence[str], hasher: MinHasher) -> Rows:
        exact = np.frombuffer(b"".join(exact_hash(t) for t in texts), "V16") if texts else np.empty(0, "V16")
        sigs = hasher.signatures(texts) if texts else np.empty((0, hasher.cfg.num_perm), np.uint32)
        return cls(exact, sigs)


@dataclass
class Verdict:
    keep: np.ndarray  # (n_current,) bool
    reason: np.ndarray  # (n_current,) reason of each dropped row ("" when kept)
    rep: np.ndarray  # (n_current,) row of the surviving document (-1: an earlier round's)

    def dropped(self) -> Iterator[tuple[int, str, int]]:
        for row in np.flatnonzero(~self.keep):
            yield int(row), str(self.reason[row]), int(self.rep[row])


def find_duplicates(cfg: DedupConfig, previous: Rows, current: Rows) -> Verdict:
    """Which rows of `current` survive, given everything in `previous` came first (and was kept)."""
    n_prev, n = len(previous), len(current)
    position = np.arange(n_prev + n)
    rep = position.copy()
    if cfg.exact and n:
        # Rows are in global order, so their position is the key: the earliest row of each hash survives.
        rep = exact_duplicate_of(position, np.concatenate([previous.exact, current.exact]))
    exact_dup = rep != position
    near_rep = position.copy()
    if cfg.near and n:
        alive = np.flatnonzero(~exact_dup)
        sigs = np.concatenate([previous.sigs, current.sigs])[alive]
        bands = MinHasher(cfg.minhash).band_hashes(sigs)
        near_rep[alive] = alive[duplicate_of(alive.astype(np.int64), sigs, bands, cfg.minhash.threshold)]
    near_dup = near_rep != position
    rep = np.where(exact_dup, rep, near_rep)[n_prev:]
    earlier_round = rep < n_prev
    dup = exact_dup[n_prev:] | near_dup[n_prev:]
    kind = np.where(exact_dup[n_prev:], "dedup.exact", "dedup.near")
    reason = np.where(dup, np.char.add(kind, np.where(earlier_round, "_previous_round", "")), "")
    return Verdict(keep=~dup, reason=reason, rep=np.where(earlier_round, -1, rep - n_prev))
