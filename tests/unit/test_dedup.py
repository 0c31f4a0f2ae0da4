from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from launcher.cli import main
from sharding.config import DedupConfig
from sharding.dedup import INDEX, DedupIndex, find_duplicates
from sharding.minhash import MinHashConfig, MinHasher, exact_hash
from sharding.shards import Manifest

BASE = [" ".join(f"word{(i * 7919 + j * 31) % 5000} clause{j}" for j in range(120)) for i in range(6)]


def index_of(texts: list[str], file_index: int = 0) -> DedupIndex:
    cfg = MinHashConfig()
    sigs = MinHasher(cfg).signatures(texts)
    exact = np.frombuffer(b"".join(exact_hash(t) for t in texts), dtype="V16")
    index = DedupIndex.empty(cfg)
    return DedupIndex(exact, sigs, np.full(len(texts), file_index, np.int64), np.arange(len(texts), dtype=np.int64),
                      np.zeros(len(texts), bool), index.minhash)


def finished_round(folder: Path, index: DedupIndex) -> Path:
    """A shard folder as far as a later round reads it: the index, and a manifest listing it (no shards)."""
    folder.mkdir(parents=True, exist_ok=True)
    Manifest(seq_len=8, dtype="uint16", tokenizer_sha256="t", tokenizer_path="p", eos_id=0, config_sha256="c",
             dedup_index=index.save(folder / INDEX)).save(folder)
    return folder


def edited(text: str) -> str:
    words = text.split()
    words[60] = "changed"
    return " ".join(words)


def test_exact_then_near_duplicates_point_at_the_earliest_document() -> None:
    texts = [BASE[0], BASE[1], BASE[0], edited(BASE[1]), BASE[2]]
    verdict = find_duplicates(DedupConfig(), DedupIndex.empty(MinHashConfig()), index_of(texts))
    assert verdict.keep.tolist() == [True, True, False, False, True]
    assert list(verdict.dropped()) == [(2, "dedup.exact", 0), (3, "dedup.near", 1)]


def test_switching_off_near_dedup_keeps_near_copies() -> None:
    texts = [BASE[1], edited(BASE[1])]
    verdict = find_duplicates(DedupConfig(near=False), DedupIndex.empty(MinHashConfig()), index_of(texts))
    assert verdict.keep.tolist() == [True, True]


def test_previous_round_wins_and_its_index_round_trips(tmp_path: Path) -> None:
    first = index_of(BASE[:3])
    finished_round(tmp_path, first.extended(index_of([]), np.zeros(0, bool)))
    previous = DedupIndex.load_many([tmp_path], MinHashConfig())
    assert previous.exact.tobytes() == first.exact.tobytes() and np.array_equal(previous.sigs, first.sigs)
    verdict = find_duplicates(DedupConfig(), previous, index_of([BASE[0], edited(BASE[2]), BASE[4]]))
    assert [(r, reason) for r, reason, _ in verdict.dropped()] == [(0, "dedup.exact_previous_round"),
                                                                  (1, "dedup.near_previous_round")]
    assert verdict.keep.tolist() == [False, False, True]


def test_hashes_ending_in_zero_bytes_survive_the_index(tmp_path: Path) -> None:
    index = index_of(BASE[:2])
    index.exact = np.frombuffer(bytes(15) + b"\x00" + b"\x01" * 15 + b"\x00", dtype="V16")
    finished_round(tmp_path, index)
    assert DedupIndex.load_many([tmp_path], MinHashConfig()).exact.tobytes() == index.exact.tobytes()


def test_a_damaged_index_is_refused_by_inspect_and_by_the_next_round(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    folder = finished_round(tmp_path / "round1", index_of(BASE[:4]))
    assert main(["inspect", str(folder), "--verify"]) == 0
    assert "verified 0 shards and the dedup index: 0 bad" in capsys.readouterr().out
    data = bytearray((folder / INDEX).read_bytes())
    data[len(data) // 2] ^= 0x04  # same size: only the sha256 can tell
    (folder / INDEX).write_bytes(bytes(data))
    assert main(["inspect", str(folder), "--verify"]) == 1
    printed = capsys.readouterr().out
    assert f"BAD {INDEX}: sha256 differs from the manifest" in printed and ": 1 bad" in printed
    with pytest.raises(ValueError, match=rf"^shard.dedup.previous: {folder / INDEX} is not the index its manifest "
                                         "lists .*sha256 differs"):
        DedupIndex.load_many([folder], MinHashConfig())
    (folder / "manifest.json").unlink()
    with pytest.raises(ValueError, match="no manifest.json"):
        DedupIndex.load_many([folder], MinHashConfig())
