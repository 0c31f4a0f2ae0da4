from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from sharding.minhash import (
    EMPTY,
    MERSENNE,
    MinHashConfig,
    MinHasher,
    duplicate_of,
    exact_duplicate_of,
    exact_hash,
    shingles,
    words,
)

REPO = Path(__file__).resolve().parents[2]
CFG = MinHashConfig()


def _vocabulary(rng: np.random.Generator, size: int = 3000) -> np.ndarray:
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    return np.array(["".join(rng.choice(letters, rng.integers(2, 10))) for _ in range(size)])


def _docs(count: int, length: int, seed: int) -> list[list[str]]:
    """Word lists drawn Zipf-like from one vocabulary: common words recur, as in real text."""
    rng = np.random.default_rng(seed)
    vocab = _vocabulary(np.random.default_rng(0))
    p = 1.0 / np.arange(1, len(vocab) + 1)
    return [list(rng.choice(vocab, length, p=p / p.sum())) for _ in range(count)]


def _rewrite_span(doc: list[str], fraction: float, seed: int) -> list[str]:
    """A near copy: one contiguous run of `fraction` of the words replaced, e.g. a rewritten sentence."""
    rng = np.random.default_rng(seed)
    span = max(1, round(fraction * len(doc)))
    at = int(rng.integers(0, len(doc) - span))
    return doc[:at] + [f"new{i}" for i in range(span)] + doc[at + span:]


def _scatter_edits(doc: list[str], fraction: float, seed: int) -> list[str]:
    """Insert, delete or replace single words at random places, `fraction` of the words in all."""
    rng = np.random.default_rng(seed)
    out = list(doc)
    for _ in range(round(fraction * len(doc))):
        at, op = int(rng.integers(0, len(out))), rng.integers(3)
        if op == 0:
            out.insert(at, f"ins{at}")
        elif op == 1:
            del out[at]
        else:
            out[at] = f"rep{at}"
    return out


def _true_jaccard(a: str, b: str) -> float:
    sa, sb = set(shingles(a, CFG.ngram)), set(shingles(b, CFG.ngram))
    return len(sa & sb) / len(sa | sb)


def _dedup(texts: list[str]) -> np.ndarray:
    """duplicate_of with the list order as the global order."""
    hasher = MinHasher(CFG)
    sigs = hasher.signatures(texts)
    return duplicate_of(np.arange(len(texts)), sigs, hasher.band_hashes(sigs), CFG.threshold)


@pytest.mark.parametrize(("kwargs", "field"), [({"ngram": 0}, "ngram"), ({"num_perm": 0}, "num_perm"),
                                               ({"bands": 0}, "bands"), ({"bands": 5}, "num_perm"),
                                               ({"threshold": 0.0}, "threshold"), ({"threshold": 1.5}, "threshold"),
                                               ({"seed": -1}, "seed")])
def test_config_rejects_bad_values_naming_the_field(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field} must"):
        MinHashConfig(**kwargs)  # type: ignore[arg-type]
    assert MinHashConfig().rows == 7


def test_words_are_str_split_words_whatever_the_fast_path() -> None:
    ascii_all = "".join(map(chr, range(128)))
    texts = [ascii_all, ascii_all * 3 + "x", "A\x1cB\x1fC\x0bD", "Ünïcode\xa0NBSP\u2003em\u3000ideo İ x",
             "mixed ASCII and \u2028 separators", "lone \udc80 surrogate", "", " \t\n "]
    for text in texts:
        assert words(text) == [w.encode("utf-8", "surrogatepass") for w in text.lower().split()], repr(text)


def test_ascii_fast_path_and_unicode_path_hash_the_same_words_alike() -> None:
    # ngram=1: one shingle per word, so hashes can be matched to words across documents.
    hasher = MinHasher(MinHashConfig(ngram=1, num_perm=8, bands=2))
    ascii_all = "".join(map(chr, range(128)))
    texts = [ascii_all, "Hello\x1cWORLD\tfoo\x0bBar", "hello world\xa0FOO bar\u3000é", "lone \udc80 HELLO",
             "x" * 300_000 + " hello", " hello " * 40_000]  # the last two exceed one hashing step
    seen: dict[bytes, int] = {}
    for text in texts:
        reference, hashes = shingles(text, 1), hasher.shingle_hashes(text).tolist()
        assert len(reference) == len(hashes), repr(text[:40])
        for word, h in zip(reference, hashes, strict=True):
            assert seen.setdefault(word, h) == h, word
    assert len(set(seen.values())) == len(seen)
    batch = hasher._batch_shingles(texts)[0]  # batched, the long documents share steps with others
    assert batch.tolist() == [h for t in texts for h in hasher.shingle_hashes(t).tolist()]


def test_signatures_are_the_universal_hash_minimum_and_batch_independent() -> None:
    hasher = MinHasher(CFG)
    texts = [" ".join(d) for d in _docs(6, 1500, seed=1)]  # ~9000 shingles: several chunks, docs straddling them
    texts[2:2] = ["", "two words", "exactly five words here now", " \n "]
    sigs = hasher.signatures(texts)
    assert sigs.shape == (len(texts), CFG.num_perm) and sigs.dtype == np.uint32
    params = list(zip(hasher._a[:, 0].tolist(), hasher._b[:, 0].tolist(), strict=True))[:4]
    for i, text in enumerate(texts):
        assert np.array_equal(hasher.signatures([text])[0], sigs[i]), i
        h = hasher.shingle_hashes(text).tolist()
        assert all(0 <= v < MERSENNE for v in h)
        # Python's unbounded ints: the exact (a*h + b) mod p, to check the folding arithmetic against.
        expected = [min(((a * v + b) % MERSENNE for v in h), default=int(EMPTY)) for a, b in params]
        assert sigs[i, :4].tolist() == expected, i
    # Any split of the documents into batches gives the same signatures.
    assert np.array_equal(np.concatenate([hasher.signatures(texts[:3]), hasher.signatures(texts[3:])]), sigs)


def test_threads_sharing_one_hasher_get_the_serial_signatures() -> None:
    hasher = MinHasher(CFG)
    batches = [[" ".join(d) for d in _docs(20, 600, seed=20 + i)] for i in range(4)]
    serial = [hasher.signatures(b) for b in batches]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(3):  # numpy drops the GIL mid-batch: shared scratch would mix the batches up
            parallel = list(pool.map(hasher.signatures, batches))
            assert all(np.array_equal(p, s) for p, s in zip(parallel, serial, strict=True))


def test_shingle_hashes_stand_for_the_reference_shingles() -> None:
    text = "The cat sat on the mat . the CAT sat on the mat . " * 3 + "and then it left"
    hashes = MinHasher(CFG).shingle_hashes(text)
    reference = shingles(text, CFG.ngram)
    assert len(hashes) == len(reference) == len(text.split()) - CFG.ngram + 1
    first_hash: dict[bytes, int] = {}
    for shingle, h in zip(reference, hashes.tolist(), strict=True):
        assert first_hash.setdefault(shingle, h) == h  # equal shingles hash equal
    assert len(set(first_hash.values())) == len(first_hash)  # distinct shingles hash apart


SUBPROCESS = """
import json, sys
from sharding.minhash import MinHashConfig, MinHasher
texts = json.loads(sys.stdin.read())
sigs = MinHasher(MinHashConfig(seed=7)).signatures(texts)
print(json.dumps(sigs.tolist()))
"""


def test_signatures_are_the_same_in_another_process_with_another_hash_seed() -> None:
    texts = [" ".join(d) for d in _docs(3, 200, seed=2)] + ["Short one", "ünïcode wörds here in a row"]
    mine = MinHasher(MinHashConfig(seed=7)).signatures(texts).tolist()
    for hash_seed in ("1", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO)}
        out = subprocess.run([sys.executable, "-c", SUBPROCESS], input=json.dumps(texts), env=env, cwd=REPO,
                             capture_output=True, text=True, check=True, timeout=120)
        assert json.loads(out.stdout) == mine
    assert mine != MinHasher(MinHashConfig(seed=8)).signatures(texts).tolist()  # the seed does matter


def test_signature_values_are_pinned_because_indexes_of_earlier_rounds_store_them() -> None:
    # Changing word splitting, hashing or parameter derivation breaks `dedup.previous`: it must be deliberate.
    sig = MinHasher(CFG).signatures(["The quick brown fox jumps over the lazy dog"])[0]
    assert sig[:4].tolist() == [149594832, 580345941, 305808541, 6112742]


def test_identical_documents_collide_whatever_case_and_spacing() -> None:
    base = " ".join(_docs(1, 300, seed=3)[0])
    texts = [base, base.upper().replace(" ", "  \n"), " ".join(_docs(1, 300, seed=4)[0])]
    hasher = MinHasher(CFG)
    sigs = hasher.signatures(texts)
    assert np.array_equal(sigs[0], sigs[1]) and np.array_equal(hasher.band_hashes(sigs)[0],
                                                               hasher.band_hashes(sigs)[1])
    assert _dedup(texts).tolist() == [0, 0, 2]


def test_near_copies_are_found_and_unrelated_documents_are_not() -> None:
    bases = [" ".join(d) for d in _docs(40, 400, seed=5)]
    copies = [" ".join(_rewrite_span(b.split(), 0.05, seed=i)) for i, b in enumerate(bases)]
    assert min(_true_jaccard(b, c) for b, c in zip(bases, copies, strict=True)) > 0.85
    rep = _dedup(bases + copies)
    assert rep[:40].tolist() == list(range(40))  # unrelated bases all survive
    assert rep[40:].tolist() == list(range(40))  # each copy points at its own base


def test_scattered_edits_fall_below_the_threshold_as_their_jaccard_says() -> None:
    # With 5-word shingles one edited word changes up to 5 shingles: 5% scattered edits leave a Jaccard
    # near 0.6, which the default threshold of 0.75 rightly does not call a duplicate.
    bases = [" ".join(d) for d in _docs(10, 400, seed=6)]
    copies = [" ".join(_scatter_edits(b.split(), 0.05, seed=i)) for i, b in enumerate(bases)]
    assert max(_true_jaccard(b, c) for b, c in zip(bases, copies, strict=True)) < 0.75
    assert _dedup(bases + copies).tolist() == list(range(20))


def test_estimated_jaccard_is_close_to_the_true_jaccard() -> None:
    hasher = MinHasher(CFG)
    base = _docs(1, 600, seed=7)[0]
    errors = []
    for i, fraction in enumerate((0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)):
        other = _scatter_edits(base, fraction, seed=100 + i)
        a, b = " ".join(base), " ".join(other)
        sigs = hasher.signatures([a, b])
        errors.append(float((sigs[0] == sigs[1]).mean()) - _true_jaccard(a, b))
    assert max(map(abs, errors)) < 0.1, errors
    assert abs(float(np.mean(errors))) < 0.03, errors  # no bias


def test_short_and_empty_documents() -> None:
    hasher = MinHasher(CFG)
    sigs = hasher.signatures(["", " \n\t ", "Hello   WORLD", "hello world", "world hello", "hello world and more"])
    assert (sigs[:2] == EMPTY).all() and (sigs[2:] < MERSENNE).all()
    assert np.array_equal(sigs[2], sigs[3])  # a short document is one shingle of all its words
    assert not (sigs[3] == sigs[4]).any() and not (sigs[3] == sigs[5]).any()
    assert len(hasher.shingle_hashes("hello world")) == 1 and len(hasher.shingle_hashes("")) == 0
    assert len(hasher.shingle_hashes("one two three four five")) == 1
    assert len(hasher.shingle_hashes("one two three four five six")) == 2
    assert hasher.signatures([]).shape == (0, CFG.num_perm)


def _clustered_corpus() -> list[str]:
    bases = [" ".join(d) for d in _docs(30, 300, seed=8)]
    texts = list(bases)
    for i, base in enumerate(bases[:20]):
        texts += [base, " ".join(_rewrite_span(base.split(), 0.04, seed=i))]  # an exact and a near copy
    return texts


def test_survivors_do_not_depend_on_row_order_or_partitioning() -> None:
    hasher = MinHasher(CFG)
    texts = _clustered_corpus()
    rng = np.random.default_rng(9)
    keys = rng.permutation(10_000)[: len(texts)].astype(np.int64)  # unique global keys, not row numbers
    sigs = np.concatenate([hasher.signatures(texts[s:s + 7]) for s in range(0, len(texts), 7)])
    assert np.array_equal(sigs, hasher.signatures(texts))
    bands = hasher.band_hashes(sigs)
    rep = duplicate_of(keys, sigs, bands, CFG.threshold)
    assert (rep != np.arange(len(texts))).sum() == 40
    assert (keys[rep] <= keys).all()  # the survivor is always the earliest document
    for trial in range(5):
        perm = rng.permutation(len(texts))
        shuffled = duplicate_of(keys[perm], sigs[perm], bands[perm], CFG.threshold)
        assert np.array_equal(perm[shuffled], rep[perm]), trial
    # Two-column keys (file, record) order like their lexicographic order.
    two = np.stack([keys // 100, keys % 100], axis=1)
    assert np.array_equal(duplicate_of(two, sigs, bands, CFG.threshold), rep)
    structured = np.array([tuple(k) for k in two.tolist()], dtype=[("file_index", "i8"), ("record", "i8")])
    assert np.array_equal(duplicate_of(structured, sigs, bands, CFG.threshold), rep)


def test_clusters_are_transitive_and_point_at_the_earliest_member() -> None:
    hasher = MinHasher(CFG)
    rng = np.random.default_rng(10)
    a = rng.integers(0, MERSENNE, CFG.num_perm).astype(np.uint32)
    b, c = a.copy(), a.copy()
    b[:16] += 1  # bands 0-1 differ from a: similarity 0.857
    c[:32] += 1  # bands 0-3 differ from a (similarity 0.714), bands 2-3 from b (0.857)
    sigs = np.stack([c, a, b, rng.integers(0, MERSENNE, CFG.num_perm).astype(np.uint32)])
    bands = hasher.band_hashes(sigs)
    assert duplicate_of(np.array([3, 1, 2, 0]), sigs, bands, 0.8).tolist() == [1, 1, 1, 3]
    assert duplicate_of(np.array([0, 1, 2, 3]), sigs, bands, 0.8).tolist() == [0, 0, 0, 3]
    assert duplicate_of(np.array([0, 1, 2, 3]), sigs, bands, 0.9).tolist() == [0, 1, 2, 3]


def test_keys_must_be_unique() -> None:
    sigs = np.zeros((2, CFG.num_perm), np.uint32)
    with pytest.raises(ValueError, match="keys must be unique"):
        duplicate_of(np.array([5, 5]), sigs, MinHasher(CFG).band_hashes(sigs), 0.8)


def test_exact_duplicates_keep_the_smallest_key() -> None:
    texts = ["alpha", "beta", "alpha", "gamma", "beta", "alpha"]
    hashes = [exact_hash(t) for t in texts]
    assert len(hashes[0]) == 16 and hashes[0] == exact_hash("alpha") != exact_hash("Alpha")
    keys = np.array([50, 40, 30, 20, 10, 60])
    assert exact_duplicate_of(keys, hashes).tolist() == [2, 4, 2, 3, 4, 2]
    perm = np.array([5, 3, 1, 0, 4, 2])
    assert np.array_equal(perm[exact_duplicate_of(keys[perm], [hashes[i] for i in perm])],
                          exact_duplicate_of(keys, hashes)[perm])
    assert exact_hash("lone \udc80 surrogate") != exact_hash("lone surrogate")
