"""MinHash signatures and LSH near-duplicate clusters, deterministic and vectorised with numpy.

Signatures are saved in the dedup index and compared against later rounds, possibly made by
another process, machine or numpy version. So nothing here may depend on Python's `hash()`,
PYTHONHASHSEED or numpy's random streams: words get a polynomial hash of their UTF-8 bytes,
permutation parameters and multipliers come from SHAKE-256, and all mixing is fixed integer
arithmetic. Changing any of it changes every signature and makes earlier rounds' indexes
incomparable.

Which document survives a cluster depends only on the global sort keys, never on the order or
the partitioning of the rows passed in.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence

import numpy as np

from sharding.config import MinHashConfig

MERSENNE = (1 << 31) - 1  # the universal hashing's prime: a*h + b < 2^62 stays exact in uint64
EMPTY = np.iinfo(np.uint32).max  # signature value of a document without words: no real value reaches it
_STEP_BYTES = 1 << 18  # text bytes whose words are hashed at once, sized so the power tables stay cached
_CHUNK_ELEMENTS = 1 << 18  # num_perm x shingles per step: ~2 MiB per uint64 buffer, about an L2 cache
_WINDOW = 8  # LSH bucket members are verified against this many predecessors (plus the bucket's first)
_VERIFY_PAIRS = 1 << 16  # candidate pairs compared at once, bounding the (pairs, num_perm) temporary


def _stable_u64(label: str, count: int) -> np.ndarray:
    """`count` uint64 constants that are the same on every machine and numpy version."""
    return np.frombuffer(hashlib.shake_256(label.encode()).digest(8 * count), dtype="<u8").astype(np.uint64)


def _powers(base: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """base^i and base^-i mod 2^64 for i < length; an odd base is invertible mod 2^64."""
    tables = []
    for b in (base, pow(base, -1, 1 << 64)):
        table = np.full(length, b, np.uint64)
        table[0] = 1
        tables.append(np.multiply.accumulate(table))
    return tables[0], tables[1]


def _fmix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's finaliser, in place: spreads a weak linear combination over all 64 bits."""
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xFF51AFD7ED558CCD)
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xC4CEB9FE1A85EC53)
    x ^= x >> np.uint64(33)
    return x


# For ASCII text one C-level pass both lowercases and maps the separators str.split() knows beyond
# bytes.split()'s (\x1c-\x1f) to spaces, so splitting bytes gives exactly str.split()'s words.
_ASCII_FOLD = bytes.maketrans(bytes(range(0x41, 0x5B)) + bytes(range(0x1C, 0x20)),
                              bytes(range(0x61, 0x7B)) + b" " * 4)


def words(text: str) -> list[bytes]:
    """The words shingles are made of: `text.lower().split()` (Unicode whitespace), UTF-8 encoded.

    The reference for tests and for feeding other MinHash libraries; `MinHasher` hashes the same
    words without building a Python object per word.
    """
    if text.isascii():  # O(1) in CPython; about half the cost of splitting str and encoding each word
        return text.encode().translate(_ASCII_FOLD).split()
    # surrogatepass: lone surrogates (from surrogateescape decoding) must not crash a shard
    return [w.encode("utf-8", "surrogatepass") for w in text.lower().split()]


def shingles(text: str, ngram: int) -> list[bytes]:
    """Reference shingles as byte strings (space-joined words): what the hashes stand for."""
    ws = words(text)
    if len(ws) < ngram:
        return [b" ".join(ws)] if ws else []
    return [b" ".join(ws[i:i + ngram]) for i in range(len(ws) - ngram + 1)]


class MinHasher:
    """Signatures, band hashes and shingle hashes for one `MinHashConfig`; safe to share between threads."""

    def __init__(self, cfg: MinHashConfig) -> None:
        self.cfg = cfg
        params = _stable_u64(f"stillroom.minhash.permutations.{cfg.seed}", 2 * cfg.num_perm)
        # Column vectors, so one broadcast multiply applies every permutation to a row of shingles.
        self._a = (np.uint64(1) + params[0::2] % np.uint64(MERSENNE - 1)).reshape(-1, 1)  # a != 0
        self._b = (params[1::2] % np.uint64(MERSENNE)).reshape(-1, 1)
        # Odd multipliers keep each word's contribution invertible mod 2^64; the last one weighs the length.
        self._gram = _stable_u64("stillroom.minhash.ngram", cfg.ngram + 1) | np.uint64(1)
        # Indexed by a shingle's word count: a short document's "a b" differs from any longer shingle.
        self._length_term = self._gram[-1] * np.arange(cfg.ngram + 1, dtype=np.uint64)
        self._band_mix = _stable_u64("stillroom.minhash.bands", cfg.rows) | np.uint64(1)
        self._chunk = max(256, _CHUNK_ELEMENTS // cfg.num_perm)
        # b materialised: adding it runs at SIMD speed, a broadcast (num_perm, 1) column ~1.7x slower.
        self._b_wide = np.ascontiguousarray(np.broadcast_to(self._b, (cfg.num_perm, self._chunk)))
        # Per-thread scratch for the permutation step: fresh multi-MB buffers per call come from mmap,
        # and their page faults cost up to 15% of the signature time.
        self._scratch = threading.local()
        self._word_base = int(_stable_u64("stillroom.minhash.word", 1)[0] | np.uint64(1))
        self._word_len = _stable_u64("stillroom.minhash.word_length", 1) | np.uint64(1)
        self._powers = _powers(self._word_base, _STEP_BYTES + 2)
        # Byte tables for ASCII text, which skips str.lower() and str.split(): A-Z weigh as a-z, and
        # \x1c-\x1f separate words as they do for str.split().
        self._space = np.zeros(256, bool)
        self._space[list(b" \t\n\v\f\r\x1c\x1d\x1e\x1f")] = True
        self._byte_value = np.arange(1, 257, dtype=np.uint64)
        self._byte_value[0x41:0x5B] += 32

    def __reduce__(self) -> tuple[type[MinHasher], tuple[MinHashConfig]]:
        return MinHasher, (self.cfg,)  # thread-local scratch does not pickle; it is rebuilt anyway

    def _word_hashes(self, parts: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """64-bit hash of every word of the byte strings, in order, and the number of words of each."""
        joined = b" ".join([b"", *parts, b""])  # a space before every word and after the last
        buf = np.frombuffer(joined, np.uint8)
        space = self._space[buf]
        edges = np.flatnonzero(space[1:] != space[:-1]) + 1
        starts, ends = edges[0::2], edges[1::2]
        lengths = np.fromiter(map(len, parts), np.int64, count=len(parts)) + 1
        part_start = np.append(np.cumsum(lengths) - lengths + 1, len(buf))
        counts = np.diff(np.searchsorted(starts, part_start))
        pw, pinv = self._powers if len(buf) <= len(self._powers[0]) else _powers(self._word_base, len(buf))
        # Polynomial hash for all words at once: prefix sums of byte * base^position, a word's slice
        # of them shifted back by base^-start so the hash does not depend on where the word stands.
        prefix = self._byte_value[buf]
        prefix *= pw[: len(buf)]
        np.cumsum(prefix, out=prefix)
        h = prefix[ends - 1] - prefix[starts - 1]
        h *= pinv[starts]
        h += (ends - starts).astype(np.uint64) * self._word_len
        return _fmix64(h), counts

    def _batch_shingles(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Shingle hashes in [0, MERSENNE) of all texts, concatenated, and the number per text."""
        n = self.cfg.ngram
        steps: list[tuple[np.ndarray, np.ndarray]] = []
        parts: list[bytes] = []
        size = 0
        for i, text in enumerate(texts):
            # ASCII (O(1) to tell) goes as is, the byte tables fold it; other text is folded by str.
            part = text.encode() if text.isascii() else " ".join(text.lower().split()).encode("utf-8", "surrogatepass")
            parts.append(part)
            size += len(part)
            if size >= _STEP_BYTES or i == len(texts) - 1:
                steps.append(self._word_hashes(parts))
                parts, size = [], 0
        wh = np.concatenate([h for h, _ in steps]) if steps else np.empty(0, np.uint64)
        counts = np.concatenate([c for _, c in steps]) if steps else np.empty(0, np.int64)
        per_doc = np.where(counts >= n, counts - n + 1, np.minimum(counts, 1))
        out_start = np.cumsum(per_doc) - per_doc
        # Every word position gets the n-gram starting there (zero-padded at the end); only windows
        # inside one document are picked, and documents shorter than n words are redone below.
        padded = np.concatenate([wh, np.zeros(n - 1, np.uint64)])
        acc = wh * self._gram[0]
        for k in range(1, n):
            acc += padded[k: k + len(wh)] * self._gram[k]
        word_start = np.cumsum(counts) - counts
        picked = acc[np.repeat(word_start - out_start, per_doc) + np.arange(int(per_doc.sum()))]
        picked += self._length_term[n]
        short = np.flatnonzero((counts > 0) & (counts < n))
        if len(short):  # one shingle of all the document's words, its length weighed in
            few = counts[short]
            whole = self._length_term[few]
            for k in range(n - 1):
                whole += np.where(k < few, padded[word_start[short] + k], np.uint64(0)) * self._gram[k]
            picked[out_start[short]] = whole
        return _fmix64(picked) % np.uint64(MERSENNE), per_doc

    def shingle_hashes(self, text: str) -> np.ndarray:
        """(shingles,) uint64 hashes in [0, 2^31 - 1) of the text's word n-grams."""
        return self._batch_shingles([text])[0]

    def signatures(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), num_perm) uint32 MinHash signatures; a text without words gets all `EMPTY`."""
        hashes, per_doc = self._batch_shingles(texts)
        sigs = np.full((len(texts), self.cfg.num_perm), EMPTY, np.uint32)
        doc_of_start = np.flatnonzero(per_doc)  # documents with shingles, in order
        doc_start = (np.cumsum(per_doc) - per_doc)[doc_of_start]
        mersenne = np.uint64(MERSENNE)
        if not hasattr(self._scratch, "x"):
            self._scratch.x, self._scratch.tmp = np.empty((2, self.cfg.num_perm, self._chunk), np.uint64)
        x, tmp = self._scratch.x, self._scratch.tmp
        for lo in range(0, len(hashes), self._chunk):
            h = hashes[lo: lo + self._chunk]
            xc, tc = x[:, : len(h)], tmp[:, : len(h)]
            np.multiply(self._a, h, out=xc)
            xc += self._b_wide[:, : len(h)]
            # x mod (2^31 - 1) without division: fold the high bits onto the low ones (x < 2^62, so the
            # result is < 2^32 - 2), then one subtraction; as unsigned, t - p wraps above t when t < p.
            np.right_shift(xc, 31, out=tc)
            xc &= mersenne
            xc += tc
            np.subtract(xc, mersenne, out=tc)
            np.minimum(xc, tc, out=xc)
            # Segments of this chunk: each document starting in it, plus the tail of one started before.
            first = np.searchsorted(doc_start, lo, side="right") - 1
            last = np.searchsorted(doc_start, lo + len(h), side="left")
            seg_docs = doc_of_start[first:last]
            seg_starts = np.maximum(doc_start[first:last] - lo, 0)
            mins = np.minimum.reduceat(xc, seg_starts, axis=1).T.astype(np.uint32)
            sigs[seg_docs] = np.minimum(sigs[seg_docs], mins)
        return sigs

    def band_hashes(self, sigs: np.ndarray) -> np.ndarray:
        """(n, bands) uint64: one hash per band of rows, equal when the band's rows are all equal."""
        rows = sigs.reshape(len(sigs), self.cfg.bands, self.cfg.rows)  # a view: no uint64 copy of all sigs
        acc = np.zeros((len(sigs), self.cfg.bands), np.uint64)
        for j in range(self.cfg.rows):
            acc += rows[:, :, j]
            acc *= self._band_mix[j]
        return _fmix64(acc)


def exact_hash(text: str) -> bytes:
    """16-byte BLAKE2b of the text, for exact deduplication."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _key_order(keys: np.ndarray) -> np.ndarray:
    """Indices of `keys` in increasing key order; keys are (n,) integers, (n, k) columns or structured."""
    keys = np.asarray(keys)
    if keys.ndim == 2:
        order = np.lexsort(keys.T[::-1])  # lexsort's last key is the primary one
        same = (keys[order][1:] == keys[order][:-1]).all(axis=1)
    elif keys.ndim == 1:
        order = np.argsort(keys, kind="stable")
        same = keys[order][1:] == keys[order][:-1]
    else:
        raise ValueError(f"keys must be (n,) or (n, k), got shape {keys.shape}")
    if same.any():  # with ties the survivor would depend on the input order
        raise ValueError(f"keys must be unique, {keys[order][1:][same][0]} appears more than once")
    return order


def _components(n: int, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Root of every node for undirected edges (lo, hi): the smallest node of its connected component."""
    parent = np.arange(n)
    while True:
        ru, rv = parent[lo], parent[hi]
        moved = ru != rv
        if not moved.any():
            return parent
        # Hooking the larger root under the smaller keeps parent[x] <= x, so the fixed point is the minimum.
        np.minimum.at(parent, np.maximum(ru, rv)[moved], np.minimum(ru, rv)[moved])
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped


def duplicate_of(keys: np.ndarray, sigs: np.ndarray, bands: np.ndarray, threshold: float) -> np.ndarray:
    """(n,) int64: i for a kept row, else the row of the earliest (smallest key) document of its cluster.

    Candidates share a band hash in some band; a pair is a duplicate when at least `threshold` of
    its signature rows are equal; clusters are the connected components of duplicate pairs.
    """
    n = len(sigs)
    if not (len(keys) == n == len(bands)):
        raise ValueError(f"keys, sigs and bands must have the same length, got {len(keys)}, {n}, {len(bands)}")
    order = _key_order(keys)
    # Work with ranks (positions in key order), so every tie-break below follows the keys alone.
    code = np.empty(0, np.int64)  # candidate pairs as lo * n + hi, ranks lo < hi
    for band in range(bands.shape[1] if n else 0):
        column = bands[order, band]
        by_value = np.argsort(column, kind="stable")  # equal values stay in rank order
        value = column[by_value]
        bucket = np.flatnonzero(np.concatenate([[True], value[1:] != value[:-1]]))
        size = np.diff(np.append(bucket, n))
        pos = np.flatnonzero(np.repeat(size > 1, size))  # members of shared buckets, usually few
        if not len(pos):
            continue
        head = np.repeat(bucket, size)[pos]
        pairs = [code]
        for d in range(1, _WINDOW + 1):
            ok = pos - d >= head
            pairs.append(by_value[pos[ok] - d] * n + by_value[pos[ok]])
        far = pos - head > _WINDOW  # big buckets: also compare each member with the bucket's earliest
        pairs.append(by_value[head[far]] * n + by_value[pos[far]])
        code = np.unique(np.concatenate(pairs))  # per band, so a pair found in every band is held once
    lo, hi = code // max(n, 1), code % max(n, 1)
    same = np.empty(len(code), bool)
    for s in range(0, len(code), _VERIFY_PAIRS):
        e = s + _VERIFY_PAIRS
        same[s:e] = (sigs[order[lo[s:e]]] == sigs[order[hi[s:e]]]).mean(axis=1) >= threshold
    root = _components(n, lo[same], hi[same])
    rep = np.empty(n, np.int64)
    rep[order] = order[root]
    return rep


def exact_duplicate_of(keys: np.ndarray, hashes: np.ndarray | Sequence[bytes]) -> np.ndarray:
    """(n,) int64 like `duplicate_of`, for equal `exact_hash` values: the smallest key survives.

    `hashes` are bytes, or an (n,) "V16" array as `DedupIndex` holds them (which "S16" cannot be cast from).
    """
    order = _key_order(keys)
    values = np.asarray(hashes)
    if values.dtype.kind != "V":
        values = np.asarray(hashes, dtype="S16")
    _, first, inverse = np.unique(values[order], return_index=True, return_inverse=True)
    rep = np.empty(len(order), np.int64)
    rep[order] = order[first[inverse.reshape(-1)]]
    return rep
