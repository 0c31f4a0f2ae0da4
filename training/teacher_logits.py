"""The teacher-logits stage: run the teacher once over the training shards and cache its top-k logits.

For every token shard `train-NNNNN.arrow` the cache holds `train-NNNNN.values.arrow` (float16) and
`train-NNNNN.indices.arrow` (int32), one row per token row, each row the (seq_len, k) top-k of the
teacher's logits flattened, in the shard format of `sharding/shards.py` (so the same reader, the
same checksums). Array element e computes the token shards i with i % tasks == e; each output file
is written under a temporary name and renamed, then its ShardInfo, as `ShardWriter.close()` returns
it, is published beside it as `train-NNNNN.values.json` (the output's completion record: a requeued
element skips the shards whose two records exist). The index step builds the cache's manifest from
those records (with the token manifest's hash, every token shard's sha256, k, the teacher's config
and weights fingerprints), writes COMPLETE, then removes the records. A distillation that reads the
cache refuses it when any of these does not match its training data or its teacher.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.publish import COMPLETE, publish_bytes, publish_json
from sharding.shards import Manifest, ShardInfo, ShardWriter
from training.config import TeacherLogitsConfig
from training.data import DataError, OpenedSource
from training.engine import load_model, model_fingerprint, shared_weights_fingerprint, weights_fingerprint
from training.kd import topk_logits

SPLITS = ("topk_values", "topk_indices")  # the cache's two splits, in the order of _outputs


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


def compute(cfg: TeacherLogitsConfig, teacher: Path, source: Path, out: Path, element: int) -> dict[str, Any]:
    """Array element `element`: the top-k logits of its token shards."""
    if (out / COMPLETE).exists():
        return {"skipped": "cache complete"}
    manifest = Manifest.load(source)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model = load_model(str(teacher), "bf16" if device.type == "cuda" else "fp32").to(device).eval()
    vocab = int(getattr(model, "config").vocab_size)  # noqa: B009 (nn.Module does not declare config)
    if cfg.k > vocab:
        raise ValueError(f"k = {cfg.k} exceeds the teacher's vocabulary of {vocab}")
    tokens = OpenedSource(source, "train")
    done = 0
    for i, shard in enumerate(manifest.split_shards("train")):
        values_path, indices_path = _outputs(out, shard)
        if i % cfg.tasks != element or (_record(values_path).exists() and _record(indices_path).exists()):
            continue
        first = tokens.starts[i]
        width = manifest.seq_len * cfg.k
        values = ShardWriter(values_path, width, np.dtype(np.float16), SPLITS[0])
        indices = ShardWriter(indices_path, width, np.dtype(np.int32), SPLITS[1])
        for start in range(0, shard.rows, cfg.batch):
            rows = [tokens.get(first + r) for r in range(start, min(start + cfg.batch, shard.rows))]
            batch = torch.from_numpy(np.stack(rows).astype(np.int64)).to(device)
            with torch.no_grad():
                top_values, top_indices = topk_logits(model(input_ids=batch).logits.float(), cfg.k)
            values.write(top_values.cpu().numpy().reshape(len(rows), width))
            indices.write(top_indices.to(torch.int32).cpu().numpy().reshape(len(rows), width))
        for writer in (values, indices):
            # Only close() knows the whole ShardInfo (its checksums were taken as the batches were written);
            # the record is published after the file, so it exists only for a whole one.
            publish_json(_record(writer.path), asdict(writer.close()))
        done += 1
    return {"shards": done}


def index(cfg: TeacherLogitsConfig, teacher: Path, source: Path, out: Path) -> dict[str, Any]:
    """The single last task: the cache's manifest from the outputs' records, then COMPLETE.

    It also hashes the teacher's weights (one read of them: 16 GB for 8B in bf16, see weights_fingerprint), so
    that a distillation can tell that the teacher it is given is the one the cache was made with.
    """
    if (out / COMPLETE).exists():
        _remove_records(out)  # left by a kill between COMPLETE and their removal
        return {"skipped": "cache complete"}
    tokens = Manifest.load(source)
    infos = [_recorded(path, split, shard.rows) for shard in tokens.split_shards("train")
             for path, split in zip(_outputs(out, shard), SPLITS, strict=True)]
    manifest = Manifest(seq_len=tokens.seq_len * cfg.k, dtype="float16", tokenizer_sha256=tokens.tokenizer_sha256,
                        tokenizer_path=tokens.tokenizer_path, eos_id=tokens.eos_id, config_sha256=tokens.config_sha256,
                        shards=tuple(infos), extra={
                            "k": cfg.k, "token_seq_len": tokens.seq_len, "token_manifest_sha256": tokens.sha256(),
                            "token_shards": [s.sha256 for s in tokens.split_shards("train")],
                            "teacher": str(teacher), "teacher_fingerprint": model_fingerprint(str(teacher)),
                            "teacher_weights": weights_fingerprint(teacher)})
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

    def __init__(self, folder: Path, tokens: OpenedSource, teacher: Path) -> None:
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
        self.k, self.seq_len = int(extra["k"]), int(extra["token_seq_len"])
        self.values = OpenedSource(folder, "topk_values")
        self.indices = OpenedSource(folder, "topk_indices")

    def batch(self, rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
        shape = (len(rows), self.seq_len, self.k)
        values = np.stack([self.values.get(r) for r in rows]).reshape(shape)
        indices = np.stack([self.indices.get(r) for r in rows]).reshape(shape).astype(np.int64)
        return values, indices
