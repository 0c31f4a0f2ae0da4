"""The teacher-logits stage: run the teacher once over the training shards and cache its top-k logits.

For every token shard `train-NNNNN.arrow` the cache holds `train-NNNNN.values.arrow` (float16) and
`train-NNNNN.indices.arrow` (int32), one row per token row, each row the (seq_len, k) top-k of the
teacher's logits flattened, in the shard format of `sharding/shards.py` (so the same reader, the
same checksums). Array element e computes the token shards i with i % tasks == e; each output file
is written under a temporary name and renamed, so a requeued element skips the shards it finished.
The index step writes the cache's manifest (the token manifest's hash, every token shard's sha256,
k, the teacher's fingerprint) and COMPLETE. A distillation that reads the cache refuses it when any
of these does not match its training data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.publish import COMPLETE, publish_bytes
from sharding.shards import Manifest, ShardInfo, ShardWriter, sha256_file
from training.config import TeacherLogitsConfig
from training.data import DataError, OpenedSource
from training.engine import load_model, model_fingerprint
from training.kd import topk_logits


def _outputs(out: Path, shard: ShardInfo) -> tuple[Path, Path]:
    stem = shard.path.removesuffix(".arrow")
    return out / f"{stem}.values.arrow", out / f"{stem}.indices.arrow"


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
        if i % cfg.tasks != element or (values_path.exists() and indices_path.exists()):
            continue
        first = tokens.starts[i]
        width = manifest.seq_len * cfg.k
        values = ShardWriter(values_path, width, np.dtype(np.float16), "topk_values")
        indices = ShardWriter(indices_path, width, np.dtype(np.int32), "topk_indices")
        for start in range(0, shard.rows, cfg.batch):
            rows = [tokens.get(first + r) for r in range(start, min(start + cfg.batch, shard.rows))]
            batch = torch.from_numpy(np.stack(rows).astype(np.int64)).to(device)
            with torch.no_grad():
                top_values, top_indices = topk_logits(model(input_ids=batch).logits.float(), cfg.k)
            values.write(top_values.cpu().numpy().reshape(len(rows), width))
            indices.write(top_indices.to(torch.int32).cpu().numpy().reshape(len(rows), width))
        values.close()
        indices.close()
        done += 1
    return {"shards": done}


def index(cfg: TeacherLogitsConfig, teacher: Path, source: Path, out: Path) -> dict[str, Any]:
    """The single last task: checksum every cache file into the cache's manifest, then COMPLETE."""
    if (out / COMPLETE).exists():
        return {"skipped": "cache complete"}
    tokens = Manifest.load(source)
    infos: list[ShardInfo] = []
    for shard in tokens.split_shards("train"):
        for path, split in zip(_outputs(out, shard), ("topk_values", "topk_indices"), strict=True):
            if not path.exists():
                raise RuntimeError(f"{path.name} is missing: an array element of the teacher-logits stage failed")
            infos.append(ShardInfo(path=path.name, split=split, rows=shard.rows, tokens=shard.tokens,
                                   bytes=path.stat().st_size, sha256=sha256_file(path)))
    manifest = Manifest(seq_len=tokens.seq_len * cfg.k, dtype="float16", tokenizer_sha256=tokens.tokenizer_sha256,
                        tokenizer_path=tokens.tokenizer_path, eos_id=tokens.eos_id, config_sha256=tokens.config_sha256,
                        shards=tuple(infos), extra={
                            "k": cfg.k, "token_seq_len": tokens.seq_len, "token_manifest_sha256": tokens.sha256(),
                            "token_shards": [s.sha256 for s in tokens.split_shards("train")],
                            "teacher": str(teacher), "teacher_fingerprint": model_fingerprint(str(teacher))})
    manifest.save(out)
    publish_bytes(out / COMPLETE, f"{manifest.sha256()}\n".encode())
    return {"shards": len(infos) // 2}


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
        self.k, self.seq_len = int(extra["k"]), int(extra["token_seq_len"])
        self.values = OpenedSource(folder, "topk_values")
        self.indices = OpenedSource(folder, "topk_indices")

    def batch(self, rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
        shape = (len(rows), self.seq_len, self.k)
        values = np.stack([self.values.get(r) for r in rows]).reshape(shape)
        indices = np.stack([self.indices.get(r) for r in rows]).reshape(shape).astype(np.int64)
        return values, indices
