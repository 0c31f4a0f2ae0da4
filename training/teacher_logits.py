"""The teacher-logits stage: run the teacher once over the training rows a distillation will read and cache
its top-k logits.

Which rows: those of the first `samples` samples of the training stream (`MixedStream` over the one token source,
with the distillation's seed), known before training; `samples` = distill.steps x its global batch in a run
that distils, so a distillation of 10 B tokens from a 150 B-token source caches 10 B tokens' worth, not 150 B.
Without a plan (a cache made on its own) every train row. The rows, sorted, are `rows.u64` in the cache, listed
in the manifest with their sha256; a distillation refuses, naming it, a row the cache lacks.

For every token shard `train-NNNNN.arrow` holding a planned row the cache holds `train-NNNNN.values.arrow`
(float16) and `train-NNNNN.indices.arrow` (uint16 when the teacher's vocabulary fits, else int32), one row per
planned token row, each row the (seq_len, k) top-k of the teacher's logits flattened, in the shard format of
`sharding/shards.py` (so the same reader, the same checksums). Array element e computes the token shards i with
i % tasks == e; each output file
is written under a temporary name and renamed, then its ShardInfo, as `ShardWriter.close()` returns
it, is published beside it as `train-NNNNN.values.json` (the output's completion record: a requeued
element skips the shards whose two records exist). The index step builds the cache's manifest from
those records (with the token manifest's hash, every token shard's sha256, k, the teacher's config
and weights fingerprints), writes COMPLETE, then removes the records. A distillation that reads the
cache refuses it when any of these does not match its training data or its teacher.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.publish import COMPLETE, publish_bytes, publish_json, publish_json_once
from sharding.shards import Manifest, ShardInfo, ShardWriter
from training.config import ModelConfig, TeacherLogitsConfig
from training.data import DataError, MixedStream, OpenedSource
from training.doc_mask import Feed
from training.engine import load_model, model_fingerprint, shared_weights_fingerprint, weights_fingerprint
from training.kd import topk_logits

SPLITS = ("topk_values", "topk_indices")  # the cache's two splits, in the order of _outputs
ROWS = "rows.u64"  # the token rows the cache holds, sorted
PLAN = "plan.json"  # the plan the folder was started for
MASK = ModelConfig.document_mask  # the distillation's default: the cache must see documents as the student does


def planned_rows(tokens: OpenedSource, plan: tuple[int, int] | None) -> np.ndarray:
    """Sorted token rows of the first `samples` samples of the stream with `seed` (plan = (samples, seed)); every
    row without a plan. An epoch is a permutation of the rows: from one epoch on, every row."""
    if plan is None or plan[0] >= tokens.rows:
        return np.arange(tokens.rows, dtype=np.int64)
    samples, seed = plan
    stream = MixedStream([tokens], seed=seed)
    return np.unique(np.fromiter((stream.sample_id(k)[1] for k in range(samples)), np.int64, count=samples))


def _bind_plan(out: Path, plan: tuple[int, int] | None, document_mask: bool) -> None:
    """The cache folder is bound to the plan it was started for (plan.json, the first task's), and to its document
    masking: records of another plan's rows, or of other attention, would be kept as done and then refused by the
    index or the distillation, for good."""
    path = out / PLAN
    wanted = {"version": 1, "plan": None if plan is None else {"samples": plan[0], "seed": plan[1]},
              "document_mask": document_mask}
    if not path.exists():
        publish_json_once(path, wanted)
    started = json.loads(path.read_text())
    if (masked := bool(started.get("document_mask", False))) != document_mask:
        raise ValueError(f"teacher-logits cache {out} was started {'with' if masked else 'without'} document "
                         f"masking, and distill.model.document_mask is now {document_mask}; delete {out} to make the "
                         "cache anew")
    if {**started, "document_mask": masked} != wanted:  # a plan.json from before masking has no such key
        raise ValueError(f"teacher-logits cache {out} was started for {started['plan'] or 'every train row'}, not "
                         f"{wanted['plan'] or 'every train row'} (teacher_logits.samples, distill.steps, its batch "
                         f"or distill.data.seed changed); delete {out} to make the cache for the new plan")


def index_dtype(vocab: int) -> np.dtype[Any]:
    """uint16 for a vocabulary of at most 65,536 entries (a third less cache than int32), else int32."""
    return np.dtype(np.uint16) if vocab <= 1 << 16 else np.dtype(np.int32)


def _outputs(out: Path, shard: ShardInfo) -> tuple[Path, Path]:
    stem = shard.path.removesuffix(".arrow")
    return out / f"{stem}.values.arrow", out / f"{stem}.indices.arrow"


def _record(output: Path) -> Path:
    """Where the ShardInfo of a finished output file is kept until the index: `train-00000.values.json`."""
    return output.with_suffix(".json")


def _recorded(output: Path, split: str, rows: int) -> ShardInfo:
    """The ShardInfo that `ShardWriter.close()` returned for `output`, checked against the file on disk."""
    record = _record(output)
    rerun = "rerun the teacher_logits stage (its compute step redoes only what is missing)"
    if not record.is_file():
        raise RuntimeError(f"{record.name} is missing: the array element writing {output.name} did not finish; "
                           f"{rerun}")
    try:
        info = ShardInfo(**json.loads(record.read_text()))
    except (ValueError, TypeError) as e:  # TypeError: written by a version whose ShardInfo had other fields
        raise RuntimeError(f"{record.name} is not a ShardInfo record this version reads ({e}); {rerun}") from None
    size = output.stat().st_size if output.is_file() else None
    if (info.path, info.split, info.rows) != (output.name, split, rows) or info.bytes != size:
        raise RuntimeError(f"{record.name} does not describe {output.name} on disk ({size} bytes, {rows} rows of "
                           f"{split}): it records {info.bytes} bytes, {info.rows} rows of {info.split} for "
                           f"{info.path}; {rerun}")
    return info


def compute(cfg: TeacherLogitsConfig, teacher: Path, source: Path, out: Path, element: int,
            plan: tuple[int, int] | None = None, document_mask: bool = MASK) -> dict[str, Any]:
    """Array element `element`: the top-k logits of the planned rows of its token shards, the teacher seeing the
    packed documents as the distillation's student will (`document_mask`)."""
    if (out / COMPLETE).exists():
        return {"skipped": "cache complete"}
    manifest = Manifest.load(source)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model = load_model(str(teacher), "bf16" if device.type == "cuda" else "fp32").to(device).eval()
    vocab = int(getattr(model, "config").vocab_size)  # noqa: B009 (nn.Module does not declare config)
    if cfg.k > vocab:
        raise ValueError(f"k = {cfg.k} exceeds the teacher's vocabulary of {vocab}")
    out.mkdir(parents=True, exist_ok=True)
    _bind_plan(out, plan, document_mask)
    feed = Feed(manifest.eos_id, document_mask)
    tokens = OpenedSource(source, "train")
    planned = planned_rows(tokens, plan)
    done = 0
    for i, shard in enumerate(manifest.split_shards("train")):
        values_path, indices_path = _outputs(out, shard)
        mine = planned[np.searchsorted(planned, tokens.starts[i]):np.searchsorted(planned, tokens.starts[i + 1])]
        if i % cfg.tasks != element or not len(mine) or (_record(values_path).exists() and
                                                         _record(indices_path).exists()):
            continue
        width = manifest.seq_len * cfg.k
        values = ShardWriter(values_path, width, np.dtype(np.float16), SPLITS[0])
        indices = ShardWriter(indices_path, width, index_dtype(vocab), SPLITS[1])
        for start in range(0, len(mine), cfg.batch):
            rows = [tokens.get(int(r)) for r in mine[start:start + cfg.batch]]
            batch = torch.from_numpy(np.stack(rows).astype(np.int64)).to(device)
            with torch.no_grad():
                top_values, top_indices = topk_logits(model(**feed(batch)).logits.float(), cfg.k)
            values.write(top_values.cpu().numpy().reshape(len(rows), width))
            indices.write(top_indices.cpu().numpy().astype(indices.dtype).reshape(len(rows), width))
        for writer in (values, indices):
            # Only close() knows the whole ShardInfo (its checksums were taken as the batches were written);
            # the record is published after the file, so it exists only for a whole one.
            publish_json(_record(writer.path), asdict(writer.close()))
        done += 1
    return {"shards": done}


def index(cfg: TeacherLogitsConfig, teacher: Path, source: Path, out: Path,
          plan: tuple[int, int] | None = None, document_mask: bool = MASK) -> dict[str, Any]:
    """The single last task: the cache's manifest from the outputs' records, then COMPLETE.

    It also hashes the teacher's weights (one read of them: 16 GB for 8B in bf16, see weights_fingerprint), so
    that a distillation can tell that the teacher it is given is the one the cache was made with.
    """
    if (out / COMPLETE).exists():
        _remove_records(out)  # left by a kill between COMPLETE and their removal
        return {"skipped": "cache complete"}
    _bind_plan(out, plan, document_mask)
    tokens = Manifest.load(source)
    opened = OpenedSource(source, "train")
    planned = planned_rows(opened, plan)
    per_shard = np.diff(np.searchsorted(planned, opened.starts))  # planned rows in each token shard
    infos = [_recorded(path, split, int(rows)) for shard, rows in zip(tokens.split_shards("train"), per_shard,
                                                                      strict=True) if rows
             for path, split in zip(_outputs(out, shard), SPLITS, strict=True)]
    rows_data = planned.astype("<u8").tobytes()
    publish_bytes(out / ROWS, rows_data)
    manifest = Manifest(seq_len=tokens.seq_len * cfg.k, dtype="float16", tokenizer_sha256=tokens.tokenizer_sha256,
                        tokenizer_path=tokens.tokenizer_path, eos_id=tokens.eos_id, config_sha256=tokens.config_sha256,
                        shards=tuple(infos), extra={
                            "k": cfg.k, "token_seq_len": tokens.seq_len, "token_manifest_sha256": tokens.sha256(),
                            "token_shards": [s.sha256 for s in tokens.split_shards("train")],
                            "teacher": str(teacher), "teacher_fingerprint": model_fingerprint(str(teacher)),
                            "teacher_weights": weights_fingerprint(teacher), "document_mask": document_mask,
                            "rows": {"path": ROWS, "count": len(planned),
                                     "sha256": hashlib.sha256(rows_data).hexdigest(),
                                     "plan": None if plan is None else {"samples": plan[0], "seed": plan[1]}}})
    manifest.save(out)
    publish_bytes(out / COMPLETE, f"{manifest.sha256()}\n".encode())
    _remove_records(out)
    return {"shards": len(infos) // 2}


def _remove_records(out: Path) -> None:
    """The records are in the manifest now. Kept, they would double the cache's file count (4 files per token
    shard instead of 2: thousands of small files for every listing, copy and quota scan of a big cache)."""
    for record in [*out.glob("*.values.json"), *out.glob("*.indices.json")]:
        record.unlink(missing_ok=True)


class TopkCache:
    """The cached (seq_len, k) teacher top-k of training row i, checked against the token source it must match."""

    def __init__(self, folder: Path, tokens: OpenedSource, teacher: Path, document_mask: bool = MASK) -> None:
        manifest = Manifest.load(folder)
        extra = manifest.extra
        token_manifest = Manifest.load(tokens.folder)
        if extra.get("token_manifest_sha256") != tokens.manifest_sha256 or \
                extra.get("token_shards") != [s.sha256 for s in token_manifest.split_shards("train")]:
            raise DataError(f"teacher top-k cache {folder} was made for other token shards than {tokens.folder} "
                            "(manifest or shard order differs); rerun the teacher-logits stage")
        if manifest.tokenizer_sha256 != tokens.tokenizer_sha256:
            raise DataError(f"teacher top-k cache {folder} was made with another tokenizer than {tokens.folder}")
        if extra.get("teacher_fingerprint") != model_fingerprint(str(teacher)):
            raise DataError(f"teacher top-k cache {folder} was made by another teacher than {teacher}")
        if (masked := bool(extra.get("document_mask", False))) != document_mask:  # older caches: made without
            raise DataError(f"teacher top-k cache {folder} was made {'with' if masked else 'without'} document "
                            f"masking and distill.model.document_mask is {document_mask}: the teacher saw other "
                            "attention than the student would; rerun the teacher-logits stage")
        if problems := manifest.verify(folder, full=False):
            raise DataError(f"teacher top-k cache {folder}: {'; '.join(problems)}")
        if "teacher_weights" not in extra:
            raise DataError(f"teacher top-k cache {folder} does not record which weights of the teacher {teacher} "
                            "made it (an older cache); rerun the teacher_logits stage")
        # Last, after the cheap checks that every rank passes or fails alike: rank 0 reads the teacher's weights
        # once (16 GB for 8B in bf16) while the other ranks wait for its answer.
        if extra["teacher_weights"] != shared_weights_fingerprint(teacher):
            raise DataError(f"teacher top-k cache {folder} was made with other weights than those of the teacher "
                            f"{teacher} now (same config, weights fingerprint differs); rerun the teacher_logits "
                            "stage")
        self.folder, self.k, self.seq_len = folder, int(extra["k"]), int(extra["token_seq_len"])
        self.plan = extra.get("rows", {}).get("plan")
        self.rows = self._rows(folder, extra, tokens)
        self.values = OpenedSource(folder, "topk_values")
        self.indices = OpenedSource(folder, "topk_indices")

    @staticmethod
    def _rows(folder: Path, extra: dict[str, Any], tokens: OpenedSource) -> np.ndarray:
        listed = extra.get("rows")
        if listed is None:  # a cache of before the plan: every train row, in order
            return np.arange(tokens.rows, dtype=np.int64)
        data = (folder / listed["path"]).read_bytes()
        if hashlib.sha256(data).hexdigest() != listed["sha256"]:
            raise DataError(f"teacher top-k cache {folder}: {listed['path']} differs from its manifest (damaged or "
                            "replaced); rerun the teacher_logits stage")
        return np.frombuffer(data, "<u8").astype(np.int64)

    def missing(self, rows: np.ndarray) -> np.ndarray:
        """The rows of `rows` (token rows) the cache does not hold."""
        at = np.minimum(np.searchsorted(self.rows, rows), max(len(self.rows) - 1, 0))
        return rows[(self.rows[at] != rows) if len(self.rows) else np.ones(len(rows), bool)]

    def refuse_missing(self, rows: np.ndarray, why: str) -> None:
        """DataError naming the first row of `rows` the cache lacks (`why`: what reads them)."""
        if len(lacking := self.missing(rows)):
            made = "every train row" if self.plan is None else \
                f"the first {self.plan['samples']:,} samples of the stream with seed {self.plan['seed']}"
            raise DataError(f"teacher top-k cache {self.folder} lacks token row {int(lacking[0])} "
                            f"({len(lacking):,} rows in all) that {why} reads: it holds {len(self.rows):,} rows, "
                            f"{made}; rerun teacher_logits with teacher_logits.samples covering this distillation "
                            "(steps x global batch) and the same distill.data.seed")

    def batch(self, rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
        wanted = np.asarray(rows, np.int64)
        self.refuse_missing(wanted, "this batch")
        at = np.searchsorted(self.rows, wanted)
        shape = (len(rows), self.seq_len, self.k)
        values = np.stack([self.values.get(int(r)) for r in at]).reshape(shape)
        indices = np.stack([self.indices.get(int(r)) for r in at]).reshape(shape).astype(np.int64)
        return values, indices
