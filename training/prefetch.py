"""The next micro-batch read in a background thread while the current one trains.

A micro-batch is a pure function of (samples consumed before its step, micro-step, rank, world, micro-batch,
accumulation): `MixedStream._slot`. So the one after the batch just handed out is known, and is read (shard
decode, checksum, int64 copy: all in Arrow, numpy and zstd, which release the GIL) while the model computes.
It is used only when it is exactly the one asked for next; anything else (a resume, another shape) reads
synchronously, after the pending read ended, so the stream is never touched by two threads at once. The
batches are therefore the same, bit for bit, with or without prefetching, and the loader state is unchanged:
a prefetched batch that is never asked for (the run stops) is dropped.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor, wait

import numpy as np

from training.data import MixedStream

Batch = tuple[np.ndarray, list[tuple[int, int]]]
Key = tuple[int, int]  # (first sample of the step, micro-step)


class Prefetcher:
    """`next_batch(m)`: rank `rank`'s micro-batch m of the step starting at the stream's `consumed`."""

    def __init__(self, stream: MixedStream, rank: int, world: int, micro_batch: int, accum: int,
                 enabled: bool = True) -> None:
        self.stream, self.rank, self.world, self.micro_batch, self.accum = stream, rank, world, micro_batch, accum
        self.enabled = enabled
        self._pool: ThreadPoolExecutor | None = None
        self._pending: tuple[Key, Future[Batch]] | None = None
        self.hits = self.misses = 0  # prefetched batches used / batches read synchronously

    def _read(self, key: Key) -> Batch:
        return self.stream.slot(key[0], key[1], self.rank, self.world, self.micro_batch, self.accum)

    def next_batch(self, micro: int) -> Batch:
        key = (self.stream.consumed, micro)
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == key:
            batch = pending[1].result()
            self.hits += 1
        else:
            if pending is not None:
                wait([pending[1]])  # the stream is read by one thread at a time
            batch = self._read(key)
            self.misses += 1
        if self.enabled:
            step = self.world * self.micro_batch * self.accum
            after = (key[0], micro + 1) if micro + 1 < self.accum else (key[0] + step, 0)
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stillroom-prefetch")
            self._pending = (after, self._pool.submit(self._read, after))
        return batch

    def close(self) -> None:
        """Wait for the pending read (its batch is dropped) and stop the thread."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool, self._pending = None, None
