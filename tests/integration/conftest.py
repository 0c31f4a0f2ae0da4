"""Session fixtures of the integration tests: real corpora (built from installed packages), a tokenizer trained
on them, shards and tiny models; and the uninterrupted reference training runs, each computed once per session
and shared read-only by every test that compares against it."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType

import pytest

from launcher.cli import main
from launcher.run_config import load_run_config
from sharding.corpus import build_corpus, read_corpus
from sharding.tokenize import train_bpe_tokenizer
from training.tiny import build_tiny_llama

from .helpers import CPT_REFERENCE, DISTILL_REFERENCE, Reference, losses, run_dir, shard, train_config, weights


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


@pytest.fixture(scope="session")
def shards(tmp_path_factory: pytest.TempPathFactory, corpora: dict[str, Path], tokenizer_dir: Path) -> Path:
    """The training tests' shards: licenses and wiki in 64-token sequences."""
    return shard(tmp_path_factory.mktemp("cpt-shards"), [corpora["licenses"], corpora["wiki"]], tokenizer_dir,
                 "shard.seq_len=64", "shard.val_fraction=0.2")


@pytest.fixture(scope="session")
def one_task_shards(tmp_path_factory: pytest.TempPathFactory, corpora: dict[str, Path],
                    tokenizer_dir: Path) -> Iterator[Path]:
    """Every corpus through `shard_config` by one local task: the output other task counts and the Slurm job
    array must reproduce byte for byte (test_shard_stage.py). Shared: read it, never write to it."""
    out = shard(tmp_path_factory.mktemp("one-task-shards"), list(corpora.values()), tokenizer_dir, "shard.tasks=1")
    with _unchanged(out):
        yield out


@pytest.fixture(scope="session")
def base_model(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    return build_tiny_llama(tokenizer_dir / "tokenizer.json", tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="session")
def teacher_model(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A 4-layer tiny Llama: a teacher whose half is a 2-layer student."""
    return build_tiny_llama(tokenizer_dir / "tokenizer.json", tmp_path_factory.mktemp("teacher") / "tiny", layers=4,
                            seed=1)


def _digest(folder: Path) -> str:
    """Every file's path and bytes under `folder`, hashed."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


@contextmanager
def _unchanged(folder: Path) -> Iterator[None]:
    """Around a session fixture's yield: fails the fixture's last user if anything under `folder` changed in
    between (what is shared must never be written to)."""
    before = _digest(folder)
    yield
    assert _digest(folder) == before, f"a test wrote into the shared {folder}"


def _reference(folder: Path, stage: str, shards: Path, model: Path, overrides: tuple[str, ...]) -> Iterator[Reference]:
    config = train_config(folder, stage, shards, model)
    assert main(["run", str(config), *overrides]) == 0
    out = run_dir(folder, stage)
    arrays = weights(out, stage)
    for array in arrays.values():
        array.flags.writeable = False
    with _unchanged(out / stage):  # what the stage wrote: export, checkpoints, metrics
        yield Reference(stage, overrides, out, getattr(load_run_config(config, list(overrides)), stage),
                        MappingProxyType(losses(out, stage)), MappingProxyType(arrays))


@pytest.fixture(scope="session")
def cpt_reference(tmp_path_factory: pytest.TempPathFactory, shards: Path, base_model: Path) -> Iterator[Reference]:
    yield from _reference(tmp_path_factory.mktemp("cpt-reference"), "cpt", shards, base_model, CPT_REFERENCE)


@pytest.fixture(scope="session")
def distill_reference(tmp_path_factory: pytest.TempPathFactory, shards: Path,
                      teacher_model: Path) -> Iterator[Reference]:
    yield from _reference(tmp_path_factory.mktemp("distill-reference"), "distill", shards, teacher_model,
                          DISTILL_REFERENCE)
