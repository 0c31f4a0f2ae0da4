"""The shard stage: a job array maps input files to cleaned, tokenized work files, then one
reduce job deduplicates globally, packs and writes the shards, the index and the manifest.

Both steps are pure functions of (config, rank, world size): input file i belongs to array
element i % world, work files are named by input file, and everything the reduce writes depends
only on the global document order, so the output is byte-identical for any number of tasks.
Each input file's tally is written last, after its work files: it is the file's completion
marker, and a requeued task starts again at the first file without one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from common.publish import commit_file, publish_bytes, publish_json, remove_stale_temps, temp_path
from sharding.clean import build_steps
from sharding.config import ShardConfig
from sharding.dedup import DedupIndex, find_duplicates
from sharding.documents import Doc, Tally
from sharding.minhash import MinHasher, exact_hash
from sharding.packing import pack_and_write
from sharding.readers import expand_inputs, location, preflight, read_file
from sharding.tokenize import load_tokenizer

COMPLETE = "COMPLETE"
WORK = "work"


def work_paths(out: Path, index: int) -> tuple[Path, Path, Path]:
    """(dedup columns, tokens, tally) of input file `index`."""
    stem = out / WORK / f"{index:06d}"
    return stem.with_suffix(".dedup.arrow"), stem.with_suffix(".tokens.arrow"), stem.with_suffix(".tally.json")


def check_inputs(cfg: ShardConfig) -> None:
    """Everything that would stop the stage, checked before any job is submitted."""
    if not cfg.inputs:
        raise ValueError("shard.inputs is empty: give files, folders or globs of the corpus")
    preflight(expand_inputs(cfg.inputs), cfg.reader)
    load_tokenizer(cfg.tokenizer, cfg.eos_token)


def in_validation(group: str, fraction: float) -> bool:
    """Deterministic split by a hash of the document's group: the same on every run and rank."""
    value = int.from_bytes(hashlib.blake2b(group.encode(), digest_size=8).digest(), "little")
    return value < fraction * 2**64


class _Progress:
    """A log line every `every` seconds: progress bars do not survive Slurm log files."""

    def __init__(self, label: str, every: float = 10.0) -> None:
        self.label, self.every = label, every
        self.start = self.last = time.monotonic()
        self.docs = self.chars = 0

    def add(self, docs: int, chars: int, where: str) -> None:
        self.docs += docs
        self.chars += chars
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self.report(where)

    def report(self, where: str) -> None:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        print(f"[{self.label}] {where}: {self.docs} docs, {self.docs / elapsed:.0f} docs/s, "
              f"{self.chars / elapsed / 1e6:.2f} MB/s", flush=True)


def map_files(cfg: ShardConfig, out: Path, rank: int, world: int) -> dict[str, Any]:
    """Array element `rank` of `world`: clean, hash and tokenize every input file i with i % world == rank."""
    if (out / COMPLETE).exists():
        return {"skipped": "stage already complete"}
    threads = cfg.threads or cfg.resources.cpus_per_task
    os.environ.setdefault("RAYON_NUM_THREADS", str(threads))  # read when the tokenizer first runs in parallel
    files = expand_inputs(cfg.inputs)
    tokenizer, _ = load_tokenizer(cfg.tokenizer, cfg.eos_token)
    steps = build_steps(cfg.clean, cfg.reader.text_field)
    hasher = MinHasher(cfg.dedup.minhash)
    (out / WORK).mkdir(parents=True, exist_ok=True)
    progress = _Progress(f"map {rank}/{world}")
    done = 0
    with ThreadPoolExecutor(max_workers=1) as pool:
        for index in range(rank, len(files), world):
            if work_paths(out, index)[2].exists():
                continue  # finished by an earlier attempt
            _map_file(files[index], index, cfg=cfg, out=out, tokenizer=tokenizer, steps=steps, hasher=hasher,
                      pool=pool, progress=progress)
            done += 1
    progress.report(f"{done} files")
    return {"files": done}


def _encode(cfg: ShardConfig, docs: list[Doc], tokenizer: Any, hasher: MinHasher) -> tuple[pa.RecordBatch, ...]:
    """Runs on the worker thread: the tokenizer and numpy release the GIL while cleaning goes on."""
    texts = [d.text for d in docs]
    encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    ids = [np.asarray(e.ids, dtype=np.uint32) for e in encodings]
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum([len(i) for i in ids], out=offsets[1:])
    records = pa.array([d.record for d in docs], pa.int64())
    sigs = hasher.signatures(texts)
    dedup = pa.record_batch({
        "record": records,
        "val": pa.array([in_validation(d.group, cfg.val_fraction) for d in docs]),
        "exact": pa.array([exact_hash(t) for t in texts], pa.binary(16)),
        "sig": pa.FixedSizeListArray.from_arrays(pa.array(sigs.reshape(-1)), sigs.shape[1]),
    })
    values = np.concatenate(ids) if ids else np.empty(0, np.uint32)
    tokens = pa.record_batch({"record": records,
                              "tokens": pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))})
    return dedup, tokens


def _map_file(path: Path, index: int, *, cfg: ShardConfig, out: Path, tokenizer: Any, steps: list[Any],
              hasher: MinHasher, pool: ThreadPoolExecutor, progress: _Progress) -> None:
    """Input file `index` (at `path`) to its work files, then its tally: the file's completion marker."""
    dedup_path, tokens_path, tally_path = work_paths(out, index)
    temps = {target: temp_path(target) for target in (dedup_path, tokens_path)}  # pyarrow writes them by name
    tally = Tally()
    writers: dict[Path, Any] = {}
    pending: Future[tuple[pa.RecordBatch, ...]] | None = None

    def write(batches: tuple[pa.RecordBatch, ...]) -> None:
        for target, batch in zip((dedup_path, tokens_path), batches, strict=True):
            if target not in writers:
                sink = pa.OSFile(str(temps[target]), "wb")
                writers[target] = (sink, pa.ipc.new_file(sink, batch.schema,
                                                         options=pa.ipc.IpcWriteOptions(compression="zstd")))
            writers[target][1].write_batch(batch)

    batch: list[Doc] = []
    for doc in read_file(path, index, cfg.reader, tally):
        for step in steps:
            if reason := step(doc, tally):
                tally.drop(reason, location(path, doc.record))
                break
        else:
            batch.append(doc)
        if len(batch) >= cfg.encode_batch:
            if pending is not None:
                write(pending.result())
            pending = pool.submit(_encode, cfg, batch, tokenizer, hasher)
            progress.add(len(batch), sum(len(d.text) for d in batch), path.name)
            batch = []
    if pending is not None:
        write(pending.result())
    if batch:
        write(_encode(cfg, batch, tokenizer, hasher))
        progress.add(len(batch), sum(len(d.text) for d in batch), path.name)
    for target in (dedup_path, tokens_path):
        if target in writers:
            sink, writer = writers[target]
            writer.close()
            sink.close()
            commit_file(temps[target], target)
        else:
            target.unlink(missing_ok=True)  # a file with no surviving document has no work files
    publish_json(tally_path, tally.state_dict())


def reduce_shards(cfg: ShardConfig, out: Path, data_hash: str) -> dict[str, Any]:
    """The single reduce task: global dedup over all work files (and earlier rounds), then pack."""
    if (out / COMPLETE).exists():
        return json.loads((out / "stats.json").read_text())  # type: ignore[no-any-return]
    remove_stale_temps(out)  # the reduce is the folder's only writer: temp shards of a killed attempt
    files = expand_inputs(cfg.inputs)
    missing = [i for i in range(len(files)) if not work_paths(out, i)[2].exists()]
    if missing:
        raise RuntimeError(f"the map step has not finished {len(missing)} of {len(files)} input files "
                           f"(first: {files[missing[0]]}); rerun the stage")
    tally = Tally()
    for i in range(len(files)):
        tally.merge(Tally.from_state_dict(json.loads(work_paths(out, i)[2].read_text())))
    _, info = load_tokenizer(cfg.tokenizer, cfg.eos_token)
    previous = DedupIndex.load_many([Path(p) for p in cfg.dedup.previous], cfg.dedup.minhash)
    current = DedupIndex.from_work([work_paths(out, i)[0] for i in range(len(files))], cfg.dedup.minhash)
    verdict = find_duplicates(cfg.dedup, previous, current)
    for row, reason, rep in verdict.dropped():
        original = "an earlier round" if rep < 0 else location(files[current.file_index[rep]], current.record[rep])
        tally.drop(reason, location(files[current.file_index[row]], current.record[row]), f"duplicate of {original}")
    manifest, tokens = pack_and_write(cfg, out, current, verdict.keep, info, data_hash,
                                      [work_paths(out, i)[1] for i in range(len(files))])
    tally.docs_kept = int(verdict.keep.sum())
    if tally.docs_in != tally.docs_kept + sum(tally.dropped.values()):
        raise AssertionError(f"document accounting is off: {tally.docs_in} read, {tally.docs_kept} kept, "
                             f"{sum(tally.dropped.values())} dropped")
    previous.extended(current, verdict.keep).save(out / "dedup-index.arrow")
    stats = {**tally.state_dict(), "tokens": tokens, "dropped_total": sum(tally.dropped.values())}
    publish_json(out / "stats.json", stats)
    manifest.save(out)
    publish_bytes(out / COMPLETE, f"{manifest.sha256()}\n".encode())
    shutil.rmtree(out / WORK, ignore_errors=True)  # the shards hold everything now; work files double the disk
    return stats
