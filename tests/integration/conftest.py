"""Real corpora (built from installed packages) and a tokenizer trained on them, shared by shard tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher.cli import main
from sharding.corpus import build_corpus, read_corpus
from sharding.tokenize import train_bpe_tokenizer
from training.tiny import build_tiny_llama


@pytest.fixture(scope="session")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small slices of real corpora: legal text (licenses), encyclopaedic (wiki), news."""
    out = tmp_path_factory.mktemp("corpora")
    return {name: build_corpus(name, out, limit=limit) for name, limit in
            (("licenses", 400), ("wiki", 400), ("news", 200))}


@pytest.fixture(scope="session")
def tokenizer_dir(corpora: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = [r["text"] for path in corpora.values() for r in read_corpus(path)]
    return train_bpe_tokenizer(texts, 2000, tmp_path_factory.mktemp("tokenizer")).parent


def shard_config(folder: Path, inputs: list[Path], tokenizer: Path, *extra: str) -> Path:
    """A run config for the shard stage, small enough for tests (seq_len 128, several shards)."""
    path = folder / "shard.toml"
    path.write_text("\n".join([
        "[run]", f"root = {json.dumps(str(folder / 'runs'))}", 'name = "shard"', 'stages = ["shard"]',
        "[shard]", f"inputs = {json.dumps([str(p) for p in inputs])}", f"tokenizer = {json.dumps(str(tokenizer))}",
        "seq_len = 128", "val_fraction = 0.1", "shard_sequences = 500",
        "[shard.resources]", "time_min = 10", "mem_gb = 2", "[shard.reader]", 'group_field = "group"', *extra, "",
    ]))
    return path


@pytest.fixture(scope="session")
def shards(tmp_path_factory: pytest.TempPathFactory, corpora: dict[str, Path], tokenizer_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("cpt-shards")
    config = shard_config(folder, [corpora["licenses"], corpora["wiki"]], tokenizer_dir)
    assert main(["shard", str(config), "shard.seq_len=64", "shard.val_fraction=0.2"]) == 0
    return folder / "runs" / "shard" / "shard"


@pytest.fixture(scope="session")
def base_model(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    return build_tiny_llama(tokenizer_dir / "tokenizer.json", tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="session")
def teacher_model(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A 4-layer tiny Llama: a teacher whose half is a 2-layer student."""
    return build_tiny_llama(tokenizer_dir / "tokenizer.json", tmp_path_factory.mktemp("teacher") / "tiny", layers=4,
                            seed=1)
