"""Deterministic, resumable, multi-source training samples over shard folders (see sharding/shards.py).

The global stream is a pure function of (seed, weights, source sizes); sample k is found in O(#sources)
without replaying anything, so a resume at any point costs microseconds:

* Mixing: source s(k) of sample k follows Tijdeman's "chairman assignment" order over the weights
  quantized to integer tickets (`_tickets`): at every prefix of the stream each source's count is within
  1 - 1/(2n-2) of its weight-proportional share (within 1/2 for two sources), so even a 5% replay source is
  spread evenly rather than arriving in clumps. The order is periodic with period sum(tickets) <= 10^4;
  one period is precomputed, so s(k) and the per-source counts at k are table lookups. No RNG involved.
* Shuffling: the j-th sample drawn from source s is row perm_{s,e}(j mod rows_s), e = j // rows_s, where
  perm is a keyed 4-round Feistel permutation of [0, rows_s) with cycle walking (`_Feistel`). Every row
  appears exactly once per epoch, epochs are reshuffled, and perm(j) is O(1) in time and memory. This
  beats materialising `rng.permutation(rows)` per epoch (O(rows) memory and a stall at every epoch
  boundary, and NumPy does not promise that Generator.permutation gives the same result across releases,
  which would silently change the data order of a run resumed after an upgrade) and beats an affine map
  (a*j + b) mod rows, whose fixed stride keeps neighbouring rows of one document stream in lockstep.
  Keys come from blake2b(seed, source, epoch): stable across Python and NumPy versions.
* Steps: with world W, micro-batch B and accumulation A (global batch G = W*B*A), an optimizer step
  starting at sample c (the samples consumed before it: t*G for step t if G never changed) consumes
  samples [c, c + G): micro-step m on rank r gets slot i = m*W + r, i.e. samples [c + i*B, c + (i+1)*B).
  The slots in order i = 0..W*A-1 are the step's samples in stream order whatever W is, so a run on
  2 ranks x accum 1 resumed on 1 rank x accum 2 consumes the same ids, in the same order, per step.
* Resume: the loader state is c (plus what identifies the stream). A resumed run with another G simply
  continues at c: nothing is skipped or repeated.

Shards store uint16/uint32 tokens; everything returned for training is int64 (what torch embeddings take).
"""

from __future__ import annotations

import bisect
import hashlib
import math
import typing
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import numpy as np

from sharding.shard_reader import ShardReader, open_shard
from sharding.shards import Manifest, ManifestError
from training.config import DataConfig

STATE_VERSION = 1
TICKETS = 10_000  # mixing weights are honoured to 1/10000 of the total; bounds the precomputed period


class DataError(ValueError):
    """The training data cannot be used as configured; one line saying which source and why."""


@dataclass
class _OpenShard:
    reader: ShardReader
    batch_rows: int  # rows per record batch (all but the last batch hold exactly this many)
    index: int  # which record batch `rows` holds
    rows: np.ndarray  # the last decompressed record batch: sequential reads decompress each batch once


class OpenedSource:
    """One split of one shard folder, checked against its manifest, as a flat array of rows."""

    def __init__(self, folder: str | Path, split: str = "train", verify_hashes: bool = False, name: str = "",
                 max_open: int = DataConfig.max_open_shards) -> None:
        if max_open < 1:
            raise ValueError(f"max_open must be at least 1, got {max_open}")
        self.folder, self.split, self.max_open = Path(folder), split, max_open
        self.name = name or self.folder.resolve().name
        try:
            manifest = Manifest.load(self.folder)
        except ManifestError as e:
            raise DataError(str(e)) from None
        if problems := manifest.verify(self.folder, full=verify_hashes):
            raise DataError(f"{self.folder}: {len(problems)} bad shard(s): {'; '.join(problems)}")
        self.shards = manifest.split_shards(split)
        self.starts = [0]  # global row index of each shard's first row, in manifest order
        for shard in self.shards:
            self.starts.append(self.starts[-1] + shard.rows)
        self.rows = self.starts[-1]
        self.seq_len, self.dtype = manifest.seq_len, manifest.dtype
        self.tokenizer_sha256, self.manifest_sha256 = manifest.tokenizer_sha256, manifest.sha256()
        self.eos_id = manifest.eos_id  # what ends each packed document: where document masking restarts
        # Readers open lazily (a run may touch few of many shards) and at most max_open at a time, least recently
        # used closed first: a shuffled stream touches every shard within a few hundred steps.
        self._open: OrderedDict[int, _OpenShard] = OrderedDict()
        self.readers_opened = 0  # over the source's life: with rows_decoded, what reading it has cost
        self.rows_decoded = 0

    def _shard(self, index: int) -> _OpenShard:
        if (shard := self._open.get(index)) is not None:
            self._open.move_to_end(index)
        else:
            while len(self._open) >= self.max_open:
                self._open.popitem(last=False)[1].reader.close()
            info = self.shards[index]
            try:  # opening decodes nothing: a random row in a shard just opened decodes only its own batch
                reader = open_shard(self.folder, info, self.seq_len)
            except ManifestError as e:  # ShardCorrupt among them: the message names the file and what to run
                raise DataError(str(e)) from None
            if reader.seq_len != self.seq_len:
                reader.close()
                raise DataError(f"{self.folder}: {info.path} holds rows of {reader.seq_len} tokens, manifest says "
                                f"{self.seq_len}")
            shard = self._open[index] = _OpenShard(reader, reader.batch_rows, -1, np.empty((0, self.seq_len)))
            self.readers_opened += 1
        return shard

    def _batch(self, reader: ShardReader, b: int) -> np.ndarray:
        """Record batch b, checked against the manifest's table (formats 2 and 3) before it is decoded."""
        try:
            rows = reader.batch(b)
        except ManifestError as e:
            raise DataError(str(e)) from None
        self.rows_decoded += len(rows)
        return rows

    def get(self, i: int) -> np.ndarray:
        """Row i of the split (shards in manifest order), read-only, in the shard dtype."""
        if not 0 <= i < self.rows:
            raise IndexError(f"row {i} out of range for {self.name} ({self.split}) with {self.rows} rows")
        index = bisect.bisect_right(self.starts, i) - 1
        shard = self._shard(index)
        b, offset = divmod(i - self.starts[index], shard.batch_rows)
        if b != shard.index:
            shard.rows, shard.index = self._batch(shard.reader, b), b
            shard.rows.setflags(write=False)  # callers get views of the cache
        return shard.rows[offset]

    def close(self) -> None:
        for shard in self._open.values():
            shard.reader.close()
        self._open.clear()


def open_sources(config: DataConfig, split: str = "") -> list[OpenedSource]:
    """Every configured source, opened on `split` (default: config.split) and checked."""
    if not config.sources:
        raise DataError("no data sources configured: set data.sources to shard output folders")
    names = config.names or ("",) * len(config.sources)
    return [OpenedSource(path, split or config.split, config.verify_hashes, name, config.max_open_shards)
            for path, name in zip(config.sources, names, strict=True)]


def check_compatible(sources: Sequence[OpenedSource], tokenizer_sha256: str, seq_len: int) -> None:
    """Refuse sources tokenized for another model or packed to another length than training uses."""
    for source in sources:
        if source.tokenizer_sha256 != tokenizer_sha256:
            raise DataError(f"source {source.name} ({source.folder}) was tokenized with tokenizer "
                            f"{source.tokenizer_sha256[:12]} but the model's tokenizer is {tokenizer_sha256[:12]}")
        if source.seq_len != seq_len:
            raise DataError(f"source {source.name} ({source.folder}) has sequences of {source.seq_len} tokens "
                            f"but training uses seq_len {seq_len}")
        if source.eos_id != sources[0].eos_id:
            raise DataError(f"source {source.name} ({source.folder}) ends documents with token {source.eos_id}, "
                            f"{sources[0].name} with {sources[0].eos_id}: shard them with one shard.eos_token")


def _tickets(weights: Sequence[float]) -> list[int]:
    """Weights as the smallest integers in the same proportion, to 1/TICKETS (largest remainders)."""
    total = sum(weights)
    exact = [w * TICKETS / total for w in weights]
    tickets = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (tickets[i] - exact[i], i))
    for i in by_remainder[: TICKETS - sum(tickets)]:
        tickets[i] += 1
    if min(tickets) == 0:
        raise DataError(f"mixing weights {list(weights)}: each must be at least 1/{TICKETS} of their sum")
    g = math.gcd(*tickets)
    return [t // g for t in tickets]


class _Schedule:
    """One period of Tijdeman's chairman-assignment order for integer tickets, as lookup tables.

    At draw k (1-based) the eligible sources are those owed at least 1/(2n-2) of a draw (k*p_s - c_s),
    and of those the one whose debt would reach 1 - 1/(2n-2) soonest is drawn. Tijdeman (1980) proves
    some source is always eligible and |c_s(k) - k*p_s| <= 1 - 1/(2n-2) for every s and k. Plain smooth
    weighted round-robin does not keep that bound beyond ~5 sources. All arithmetic is integer.
    """

    def __init__(self, tickets: list[int]) -> None:
        self.tickets, self.period = tickets, sum(tickets)
        n, total, m = len(tickets), self.period, max(2 * len(tickets) - 2, 1)
        counts, order, index = [0] * n, [], []
        for k in range(1, total + 1):
            best = -1
            for s, t in enumerate(tickets):
                eligible = m * (k * t - total * counts[s]) >= total
                # deadline_s = (c_s + 1 - 1/m) / p_s, compared by cross-multiplying; ties go to the lower index
                if eligible and (best < 0 or (m * (counts[s] + 1) - 1) * tickets[best]
                                 < (m * (counts[best] + 1) - 1) * t):
                    best = s
            assert best >= 0, "Tijdeman's theorem guarantees an eligible source"
            order.append(best)
            index.append(counts[best])
            counts[best] += 1
        self.order = np.array(order, dtype=np.int64)  # source of each slot of the period
        self.index = np.array(index, dtype=np.int64)  # that source's draws before this slot in the period
        onehot = np.zeros((total + 1, n), dtype=np.int64)
        onehot[np.arange(1, total + 1), self.order] = 1
        self.prefix = np.cumsum(onehot, axis=0)  # prefix[r, s]: draws of s among the period's first r slots

    def draw(self, k: int) -> tuple[int, int]:
        """(source, how many samples that source gave before) for global sample k."""
        q, r = divmod(k, self.period)
        s = int(self.order[r])
        return s, q * self.tickets[s] + int(self.index[r])

    def drawn(self, k: int) -> list[int]:
        """Samples drawn from each source among the first k."""
        q, r = divmod(k, self.period)
        return [q * t + int(c) for t, c in zip(self.tickets, self.prefix[r], strict=True)]


def _mix64(x: int) -> int:
    """splitmix64's finalizer: a bijective 64-bit mixer with full avalanche."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


class _Feistel:
    """A keyed pseudo-random permutation of range(n): a balanced 4-round Feistel network on the smallest
    even number of bits covering n (at most 4n values), restricted to [0, n) by cycle walking (re-encrypt
    until the value lands in range; a bijection on the superset stays one on the subset; < 4 tries on
    average). Four rounds of a keyed mixer is the Luby-Rackoff construction of a strong PRP."""

    def __init__(self, n: int, key: bytes) -> None:
        self.n = n
        self.half = (max(2, (n - 1).bit_length()) + 1) // 2
        self.mask = (1 << self.half) - 1
        digest = hashlib.blake2b(key, digest_size=32).digest()
        self.keys = [int.from_bytes(digest[i:i + 8], "little") for i in range(0, 32, 8)]

    def __call__(self, j: int) -> int:
        if not 0 <= j < self.n:
            raise IndexError(f"{j} outside [0, {self.n})")
        x = j
        while True:
            left, right = x >> self.half, x & self.mask
            for key in self.keys:
                left, right = right, left ^ (_mix64(right ^ key) & self.mask)
            x = (left << self.half) | right
            if x < self.n:
                return x


class LoaderState(TypedDict):
    version: int
    samples_consumed: int  # global samples consumed by completed optimizer steps: where the stream continues
    per_source: list[int]  # samples drawn from each source so far (derived from samples_consumed; for logs)
    seed: int  # these three identify the stream: a resume with other ones is refused
    tickets: list[int]
    manifests: list[str]


class MixedStream:
    """The global training stream over several sources; see the module docstring for its definition."""

    def __init__(self, sources: Sequence[OpenedSource], weights: Sequence[float] = (), seed: int = 1234) -> None:
        if not sources:
            raise DataError("no data sources to train on")
        for source in sources:
            if source.rows == 0:
                raise DataError(f"source {source.name} ({source.folder}) has no rows in split '{source.split}'")
            if source.seq_len != sources[0].seq_len:
                raise DataError(f"source {source.name} has seq_len {source.seq_len} but source "
                                f"{sources[0].name} has {sources[0].seq_len}: they cannot share a batch")
        weights = tuple(weights) or (1.0,) * len(sources)
        if len(weights) != len(sources) or any(not (math.isfinite(w) and w > 0) for w in weights):
            raise DataError(f"need one positive weight per source ({len(sources)}), got {list(weights)}")
        self.sources, self.seed = list(sources), seed
        self.seq_len = sources[0].seq_len
        self.schedule = _Schedule(_tickets(weights))
        self._perms: dict[int, tuple[int, _Feistel]] = {}  # source -> (epoch, its permutation): current epoch only
        self.consumed = 0  # global samples consumed by completed optimizer steps: the loader's whole position

    def sample_id(self, k: int) -> tuple[int, int]:
        """(source index, row in that source's split) of global sample k."""
        if k < 0:
            raise IndexError(f"sample {k} is negative")
        s, j = self.schedule.draw(k)
        epoch, position = divmod(j, self.sources[s].rows)
        cached = self._perms.get(s)
        if cached is None or cached[0] != epoch:
            cached = self._perms[s] = (epoch, _Feistel(self.sources[s].rows, f"{self.seed}/{s}/{epoch}".encode()))
        return s, cached[1](position)

    def batch(self, step: int, micro: int, rank: int, world: int, micro_batch: int,
              accum: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """Rank `rank`'s micro-batch `micro` of step `step` of a run whose global batch never changed
        (step t starts at sample t*G): (B, seq_len) int64 token ids and their (source, row)s. Stateless."""
        return self.slot(step * world * micro_batch * accum, micro, rank, world, micro_batch, accum)

    def next_batch(self, micro: int, rank: int, world: int, micro_batch: int,
                   accum: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """Like `batch`, for the step starting at `consumed`; call `advance` after each optimizer step."""
        return self.slot(self.consumed, micro, rank, world, micro_batch, accum)

    def advance(self, samples: int) -> None:
        """Mark one optimizer step done: `samples` = its global batch W*B*A, the same on every rank."""
        if samples < 0:
            raise ValueError(f"cannot advance by {samples} samples")
        self.consumed += samples

    def slot(self, first: int, micro: int, rank: int, world: int, micro_batch: int,
              accum: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
        if min(world, micro_batch, accum) < 1 or not (0 <= micro < accum and 0 <= rank < world):
            raise ValueError(f"need 0 <= micro < accum and 0 <= rank < world, all sizes >= 1; got micro={micro} "
                             f"accum={accum} rank={rank} world={world} micro_batch={micro_batch}")
        first += (micro * world + rank) * micro_batch
        ids = [self.sample_id(k) for k in range(first, first + micro_batch)]
        return np.stack([self.sources[s].get(row) for s, row in ids]).astype(np.int64), ids

    def state_dict(self) -> LoaderState:
        """The stream's position: a few integers (and the manifests' hashes), identical on every rank."""
        return LoaderState(version=STATE_VERSION, samples_consumed=self.consumed,
                           per_source=self.schedule.drawn(self.consumed), seed=self.seed,
                           tickets=list(self.schedule.tickets),
                           manifests=[source.manifest_sha256 for source in self.sources])

    def load_state_dict(self, state: LoaderState | dict[str, object]) -> None:
        """Continue where `state` was saved, in O(#sources): nothing is replayed. `{}` means the start
        (a fresh run's checkpoint state holds no loader state yet)."""
        if not state:
            self.consumed = 0
            return
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data loader state version {state.get('version')} is not {STATE_VERSION}")
        saved = typing.cast(LoaderState, state)
        if saved["manifests"] != [source.manifest_sha256 for source in self.sources]:
            raise DataError("data loader state was saved for other sources (manifests differ); "
                            "resuming would train on a different stream")
        if saved["seed"] != self.seed or saved["tickets"] != self.schedule.tickets:
            raise DataError(f"data loader state was saved with seed {saved['seed']} and weights {saved['tickets']}, "
                            f"now seed {self.seed} and weights {self.schedule.tickets}")
        if saved["per_source"] != self.schedule.drawn(saved["samples_consumed"]):
            raise DataError(f"data loader state is inconsistent: per_source {saved['per_source']} does not "
                            f"follow from {saved['samples_consumed']} samples consumed")
        self.consumed = saved["samples_consumed"]

    def describe(self, samples: int) -> str:
        """One log line per source: size, weight and the epochs `samples` planned samples will take of it."""
        drawn, total = self.schedule.drawn(samples), self.schedule.period
        return "\n".join(
            f"{src.name}: {src.rows:,} rows ({src.rows * src.seq_len:,} tokens), weight {t / total:.4f}, "
            f"{n:,} samples = {n / src.rows:.2f} epochs"
            for src, t, n in zip(self.sources, self.schedule.tickets, drawn, strict=True))


class EvalSet:
    """The first `rows` rows (0: all) of a source opened on its val split, in fixed order, split across ranks.

    Each rank gets `batches_per_rank` full batches from its own contiguous slice: rank r reads rows
    [r*n*B, (r+1)*n*B) with n = rows // (world*B). The remainder (rows mod world*B, fewer than world*B
    rows at the end) is dropped rather than padded, so every rank runs the same number of forward passes and no padding
    or loss masking is needed; the evaluated rows are the same for any world with equal world*B.
    """

    def __init__(self, source: OpenedSource, rows: int = 0) -> None:
        self.source = source
        self.rows = min(rows, source.rows) if rows else source.rows

    def batches_per_rank(self, micro_batch: int, world: int) -> int:
        return self.rows // (world * micro_batch)

    def batches(self, micro_batch: int, rank: int, world: int) -> Iterator[np.ndarray]:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        n = self.batches_per_rank(micro_batch, world)
        if n == 0:
            raise DataError(f"source {self.source.name} has {self.rows} {self.source.split} rows: fewer than "
                            f"one batch of {micro_batch} per rank for {world} ranks")
        first = rank * n * micro_batch
        for b in range(n):
            start = first + b * micro_batch
            yield np.stack([self.source.get(i) for i in range(start, start + micro_batch)]).astype(np.int64)
