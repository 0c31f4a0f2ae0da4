"""The single-process dedup reference (`sharding.dedup.find_duplicates`): what the bucketed stage must match."""

from __future__ import annotations

from sharding.buckets import exact_words
from sharding.config import DedupConfig
from sharding.dedup import Rows, find_duplicates
from sharding.minhash import MinHashConfig, MinHasher

BASE = [" ".join(f"word{(i * 7919 + j * 31) % 5000} clause{j}" for j in range(120)) for i in range(6)]


def index_of(texts: list[str]) -> Rows:
    return Rows.of(texts, MinHasher(MinHashConfig()))


def edited(text: str) -> str:
    words = text.split()
    words[60] = "changed"
    return " ".join(words)


def test_exact_then_near_duplicates_point_at_the_earliest_document() -> None:
    texts = [BASE[0], BASE[1], BASE[0], edited(BASE[1]), BASE[2]]
    verdict = find_duplicates(DedupConfig(), index_of([]), index_of(texts))
    assert verdict.keep.tolist() == [True, True, False, False, True]
    assert list(verdict.dropped()) == [(2, "dedup.exact", 0), (3, "dedup.near", 1)]


def test_switching_off_near_dedup_keeps_near_copies() -> None:
    texts = [BASE[1], edited(BASE[1])]
    verdict = find_duplicates(DedupConfig(near=False), index_of([]), index_of(texts))
    assert verdict.keep.tolist() == [True, True]


def test_previous_round_wins() -> None:
    verdict = find_duplicates(DedupConfig(), index_of(BASE[:3]), index_of([BASE[0], edited(BASE[2]), BASE[4]]))
    assert [(r, reason) for r, reason, _ in verdict.dropped()] == [(0, "dedup.exact_previous_round"),
                                                                  (1, "dedup.near_previous_round")]
    assert verdict.keep.tolist() == [False, False, True]


def test_hashes_ending_in_zero_bytes_keep_every_byte_as_bucket_words() -> None:
    hashes = [bytes(15) + b"\x00", b"\x01" * 15 + b"\x00"]
    words = exact_words(hashes)
    assert words.shape == (2, 2) and words.astype("<u8").tobytes() == b"".join(hashes)
