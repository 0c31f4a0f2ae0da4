"""Map worker processes (shard.workers): the work files, tallies and shards are those of the task's own process."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from launcher.run_config import load_run_config
from sharding.config import ShardConfig
from sharding.reduce import run_all
from sharding.stage import WORK, map_files
from sharding.tokenize import TokenizerError, train_bpe_tokenizer

VOCAB = ["the", "and", "of", "to", "in", "that", "it", "was", "with", "for"] * 3 + \
    [f"{a}{b}" for a in ("river", "stone", "mill", "garden", "letter", "house", "window", "market") for b in "aeiouy"]


def texts(seed: int, docs: int) -> list[str]:
    """Prose-like documents, some with an e-mail address (PII edits), some too short (quality drops), some exact
    copies (dedup): drops and edits happen in the workers and must come back into the task's tally in order."""
    rng = random.Random(seed)
    out: list[str] = []
    for n in range(docs):
        if n % 11 == 0:
            out.append("too short")
        elif n % 13 == 0 and out:
            out.append(out[-1])
        else:
            words = [rng.choice(VOCAB) for _ in range(rng.randint(40, 80))]
            if n % 7 == 0:
                words.insert(5, f"person{n}@example.com")
            out.append(" ".join(words) + ".")
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    for f in range(3):
        (folder / f"{f}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts(f, 150)))
    return folder


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_bpe_tokenizer(texts(9, 100), 400, tmp_path_factory.mktemp("tokenizer"))


def config(inputs: Path, tokenizer: Path | str, workers: int) -> ShardConfig:
    return load_run_config(None, [
        f"shard.inputs={json.dumps([str(inputs / '*.jsonl')])}", f"shard.tokenizer={tokenizer}", "shard.seq_len=32",
        "shard.shard_sequences=16", 'shard.clean.steps=["normalize", "quality", "pii"]',
        "shard.clean.quality.min_words=5", "shard.encode_batch=8", "shard.threads=1", "shard.tasks=2",
        f"shard.workers={workers}"]).shard


def test_worker_processes_write_what_the_task_alone_writes(tmp_path: Path, inputs: Path, tokenizer: Path) -> None:
    results = []
    for workers in (1, 3):
        out = tmp_path / f"w{workers}"
        cfg = config(inputs, tokenizer, workers)
        for rank in range(cfg.tasks):
            map_files(cfg, out, rank, cfg.tasks)
        work = {p.name: p.read_bytes() for p in sorted((out / WORK).glob("0000*"))}
        assert len(work) == 3 * 5  # per input file: exact, bands, sigs, tokens, tally
        run_all(cfg, out, "h")  # the map is done: the steps after it
        shards = {p.name: p.read_bytes() for p in sorted(out.glob("*.arrow"))}
        results.append((work, shards, json.loads((out / "stats.json").read_text())))
    assert results[0] == results[1]
    stats = results[0][2]
    assert stats["dropped"]["quality.too_few_words"] > 0 and stats["modified"], stats  # drops and edits merged


def test_a_bad_tokenizer_is_named_before_any_worker_starts(tmp_path: Path, inputs: Path) -> None:
    with pytest.raises(TokenizerError, match="not found"):
        run_all(config(inputs, tmp_path / "nope", 2), tmp_path / "out", "h")
