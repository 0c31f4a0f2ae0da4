"""Cleaning, hashing and tokenizing the documents of a map task, batch by batch, in the task's own process or in
worker processes: results come back in input order, so the work files are the same for any number of workers.

Cleaning is pure Python and holds the GIL: in one process it tops out near 3 MB/s a core whatever the task's
cores (benchmarks/shard_throughput.py), while the tokenizer alone does ~1.9 MB/s a thread. With
`shard.workers` > 1 each worker process cleans, hashes and tokenizes whole batches (its tokenizer on one thread);
the task's process reads the file, sends batches out and writes what comes back.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from sharding.clean import build_steps
from sharding.config import ShardConfig
from sharding.documents import Doc, Tally
from sharding.minhash import MinHasher, exact_hash
from sharding.readers import location
from sharding.tokenize import load_tokenizer

Encoded = tuple[list[bytes], np.ndarray, pa.RecordBatch]  # exact hashes, MinHash signatures, tokens batch

# A worker process's tools, made once by the pool's initializer (`_start_worker`) in that process: loading the
# tokenizer for every batch would cost more than the batch. The task's own process never sets it.
_WORKER: dict[str, Tools] = {}


def in_validation(group: str, fraction: float) -> bool:
    """Deterministic split by a hash of the document's group: the same on every run and rank."""
    value = int.from_bytes(hashlib.blake2b(group.encode(), digest_size=8).digest(), "little")
    return value < fraction * 2**64


@dataclass
class Tools:
    """What cleaning and encoding a batch need, built from the config."""

    cfg: ShardConfig
    tokenizer: Any
    steps: list[Any]
    hasher: MinHasher

    @classmethod
    def build(cls, cfg: ShardConfig) -> Tools:
        tokenizer, _ = load_tokenizer(cfg.tokenizer, cfg.eos_token)
        return cls(cfg, tokenizer, build_steps(cfg.clean, cfg.reader.text_field), MinHasher(cfg.dedup.minhash))

    def clean(self, docs: list[Doc], path: Path, tally: Tally, split: bool) -> list[Doc]:
        """The documents every cleaning step keeps (edited in place); the others dropped into `tally`, located as
        records of `path` (of a piece of it when `split`)."""
        kept = []
        for doc in docs:
            for step in self.steps:
                if reason := step(doc, tally):
                    tally.drop(reason, location(path, doc.record, split))
                    break
            else:
                kept.append(doc)
        return kept

    def encode(self, docs: list[Doc]) -> Encoded:
        """Exact hashes, signatures and tokens of kept documents; the tokenizer and numpy release the GIL."""
        texts = [d.text for d in docs]
        encodings = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        ids = [np.asarray(e.ids, dtype=np.uint32) for e in encodings]
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum([len(i) for i in ids], out=offsets[1:])
        values = np.concatenate(ids) if ids else np.empty(0, np.uint32)
        fraction = self.cfg.val_fraction
        tokens = pa.record_batch({"record": pa.array([d.record for d in docs], pa.int64()),
                                  "val": pa.array([in_validation(d.group, fraction) for d in docs], pa.bool_()),
                                  "tokens": pa.LargeListArray.from_arrays(pa.array(offsets),
                                                                          pa.array(values, pa.uint32()))})
        return [exact_hash(t) for t in texts], self.hasher.signatures(texts), tokens


def _start_worker(cfg: ShardConfig, threads: int) -> None:
    os.environ["RAYON_NUM_THREADS"] = str(threads)  # read when the tokenizer first runs in parallel
    _WORKER["tools"] = Tools.build(cfg)


def _work(docs: list[Doc], path: Path, split: bool) -> tuple[Tally, int, Encoded]:
    """In a worker: one batch cleaned and encoded; (its drops and edits, its characters read, what to write)."""
    tools, tally = _WORKER["tools"], Tally()
    chars = sum(len(d.text) for d in docs)
    return tally, chars, tools.encode(tools.clean(docs, path, tally, split))


@dataclass
class Done:
    """One batch's results, in input order."""

    encoded: Encoded
    docs: int  # documents read into the batch (kept or not)
    chars: int  # their characters, as read


class MapEncoder:
    """Batches of one file's documents in, their results out in order.

    workers == 1: the task's process cleans, and a thread encodes the last batch meanwhile (the tokenizer
    releases the GIL). workers > 1: that many processes (spawned: a forked tokenizer may deadlock) each clean and
    encode whole batches, at most 2 per worker in flight.
    """

    def __init__(self, cfg: ShardConfig, workers: int, threads: int) -> None:
        self.cfg, self.workers = cfg, workers
        self._pool: Executor
        if workers <= 1:
            os.environ.setdefault("RAYON_NUM_THREADS", str(threads))  # before the tokenizer first runs in parallel
        self._tools = Tools.build(cfg)  # with workers too: a bad tokenizer or config fails here, by name
        if workers > 1:
            self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_start_worker, initargs=(cfg, max(1, threads // workers)))
        else:
            self._pool = ThreadPoolExecutor(max_workers=1)

    def run(self, docs: Iterable[Doc], path: Path, tally: Tally, split: bool = False) -> Iterator[Done]:
        """The results of `docs` (read from `path`, from a piece of it when `split`) batch by batch, in order;
        drops and edits go into `tally`."""
        inflight: deque[tuple[Future[Any], int, int]] = deque()
        limit = 2 * self.workers if self.workers > 1 else 1
        batch: list[Doc] = []
        for doc in docs:
            batch.append(doc)
            if len(batch) >= self.cfg.encode_batch:
                inflight.append(self._submit(batch, path, tally, split))
                batch = []
                while len(inflight) > limit:
                    yield self._collect(inflight.popleft(), tally)
        if batch:
            inflight.append(self._submit(batch, path, tally, split))
        while inflight:
            yield self._collect(inflight.popleft(), tally)

    def _submit(self, batch: list[Doc], path: Path, tally: Tally, split: bool) -> tuple[Future[Any], int, int]:
        if self.workers > 1:
            return self._pool.submit(_work, batch, path, split), len(batch), 0
        chars = sum(len(d.text) for d in batch)
        return self._pool.submit(self._tools.encode, self._tools.clean(batch, path, tally, split)), len(batch), chars

    def _collect(self, item: tuple[Future[Any], int, int], tally: Tally) -> Done:
        future, docs, chars = item
        if self.workers > 1:
            try:
                worker_tally, chars, encoded = future.result()
            except BrokenProcessPool:
                raise RuntimeError(f"a map worker process died before returning its batch: it could not start (see "
                                   f"the lines above) or was killed, e.g. for memory (each holds a tokenizer and up "
                                   f"to 2 batches of {self.cfg.encode_batch} documents: lower shard.workers or raise "
                                   "resources.mem_gb); a rerun keeps the files finished before") from None
            tally.merge(worker_tally)
            return Done(encoded, docs, chars)
        return Done(future.result(), docs, chars)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
