"""The `quality` cleaning step: Gopher quality and repetition rules (Rae et al. 2021, appendix A).

Words are whitespace-separated tokens (`str.split`), so punctuation stays attached; the thresholds
are Gopher's, which were tuned on tokenised words, and the difference is small for prose.

It runs on every document, so it avoids per-word Python work: words become 64-bit hashes once,
n-gram hashes are built with numpy from the (n-1)-gram ones, and the search for repeated n-grams
narrows from 2-grams to 10-grams to the positions whose shorter n-gram already repeats (an n-gram
can only repeat where its prefix does), which is a few per cent of a normal document by n = 5.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from itertools import repeat

import numpy as np

from sharding.config import QualityConfig
from sharding.documents import Doc, Tally

_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier of the polynomial n-gram hash
_HAS_LETTER = re.compile(r"[^\W\d_]\S*")  # from a word's first letter to its end: one match per word with a letter
_PARAGRAPH_BREAK = re.compile(r"\n[^\S\n]*\n\s*")
_WORD = re.compile(r"\w+")
_EDGE_PUNCTUATION = ".,;:!?\"'()[]{}<>*_`~“”‘’«»-–—/"


def word_hashes(words: Sequence[str]) -> np.ndarray:
    """One uint64 per word. str hashes are salted per process, so only compare hashes made in the same process."""
    return np.fromiter(map(hash, words), dtype=np.int64, count=len(words)).view(np.uint64)


def ngram_hashes(hashes: np.ndarray, n: int) -> np.ndarray:
    """Hash of every run of `n` consecutive words: len(hashes) - n + 1 of them (none if there are fewer words)."""
    m = len(hashes) - n + 1
    if m <= 0:
        return np.empty(0, np.uint64)
    out = hashes[:m].copy()
    for k in range(1, n):
        out *= _MULT
        out += hashes[k:k + m]
    return out


def _repeats(lines: list[str]) -> tuple[int, int]:
    """(how many items repeat an earlier one, their characters)."""
    counts = Counter(lines)
    if len(counts) == len(lines):
        return 0, 0
    return len(lines) - len(counts), sum(len(item) * (k - 1) for item, k in counts.items() if k > 1)


class QualityFilter:
    """Drops documents failing a Gopher rule; each rule has its own reason, quality.<rule>."""

    name = "quality"

    def __init__(self, cfg: QualityConfig) -> None:
        self.cfg = cfg
        self._stop = frozenset(cfg.stop_words)
        self._limits = {2: cfg.max_top_2gram, 3: cfg.max_top_3gram, 4: cfg.max_top_4gram, 5: cfg.max_dup_5gram,
                        6: cfg.max_dup_6gram, 7: cfg.max_dup_7gram, 8: cfg.max_dup_8gram, 9: cfg.max_dup_9gram,
                        10: cfg.max_dup_10gram}  # n -> largest share of characters

    def __call__(self, doc: Doc, tally: Tally) -> str | None:
        return self.check(doc.text)

    def check(self, text: str) -> str | None:
        """The first rule `text` fails, as a drop reason, or None."""
        cfg = self.cfg
        words = text.split()
        n = len(words)
        if n < cfg.min_words or n == 0:
            return "quality.too_few_words"
        if n > cfg.max_words:
            return "quality.too_many_words"
        mean = sum(map(len, words)) / n
        if not cfg.min_mean_word_length <= mean <= cfg.max_mean_word_length:
            return "quality.mean_word_length"
        if max(text.count("#"), text.count("...") + text.count("…")) > cfg.max_symbol_word_ratio * n:
            return "quality.symbol_ratio"
        # words with a letter: stripping edge punctuation then str.isalpha undercounts ("don't") but is twice as
        # fast as the exact regex, which then runs only for the ~20% of documents the quick count leaves in doubt
        if sum(map(str.isalpha, map(str.strip, words, repeat(_EDGE_PUNCTUATION)))) < cfg.min_alpha_words * n and \
                len(_HAS_LETTER.findall(text)) < cfg.min_alpha_words * n:
            return "quality.alpha_words"
        if cfg.min_stop_words and sum(map(self._stop.__contains__, words)) < cfg.min_stop_words and \
                sum(map(self._stop.__contains__, _WORD.findall(text.lower()))) < cfg.min_stop_words:
            return "quality.stop_words"  # the second count, only for the few failing the first, ignores case
        return self._lines(text) or self._ngrams(text, words)

    def _lines(self, text: str) -> str | None:
        cfg = self.cfg
        lines = [line for line in text.split("\n") if line and not line.isspace()]
        if not lines:
            return None
        bullets = sum(1 for line in lines if line.lstrip().startswith(cfg.bullets))
        if bullets > cfg.max_bullet_lines * len(lines):
            return "quality.bullet_lines"
        ellipsis = sum(1 for line in lines if line.rstrip().endswith(("...", "…")))
        if ellipsis > cfg.max_ellipsis_lines * len(lines):
            return "quality.ellipsis_lines"
        repeated, chars = _repeats(lines)
        if repeated > cfg.max_dup_lines * len(lines):
            return "quality.dup_lines"
        if chars > cfg.max_dup_line_chars * len(text):
            return "quality.dup_line_chars"
        paragraphs = _PARAGRAPH_BREAK.split(text.strip())
        repeated, chars = _repeats(paragraphs)
        if repeated > cfg.max_dup_paragraphs * len(paragraphs):
            return "quality.dup_paragraphs"
        if chars > cfg.max_dup_paragraph_chars * len(text):
            return "quality.dup_paragraph_chars"
        return None

    def _ngrams(self, text: str, words: list[str]) -> str | None:
        """Top n-gram (n = 2..4) and repeated n-gram (n = 5..10) character shares, Gopher's definitions.

        Top: characters of the most frequent n-gram (words joined by spaces) times its count; ties go to
        the longest, so the result never depends on hash order, and an n-gram occurring once counts as no
        repetition (datatrove measures an arbitrary one then). Repeated: characters of the words covered
        by an n-gram that already occurred earlier, each word counted once however many such n-grams
        overlap it (datatrove's greedy variant counts up to n-1 words fewer per repeated run).
        """
        total, count = len(text), len(words)
        if count < 2:
            return None
        hashes = word_hashes(words)

        lens: list[np.ndarray] = []  # word lengths, made on first use: many documents end before

        def covered(starts: np.ndarray, width: int) -> int:  # characters of the words in any [start, start + width)
            if not lens:
                lens.append(np.fromiter(map(len, words), dtype=np.int64, count=count))
            step = np.bincount(starts, minlength=count + width) - np.bincount(starts + width, minlength=count + width)
            return int(lens[0][np.cumsum(step[:count]) > 0].sum())

        pos = np.arange(count - 1)  # positions whose (n-1)-gram repeats; every position for n = 2
        h = ngram_hashes(hashes, 2)  # the n-gram hash at each of pos
        for n in range(2, 11):
            order = np.argsort(h, kind="stable")  # stable: the first of a run of equal hashes is the earliest
            ordered = h[order]
            same = ordered[1:] == ordered[:-1]  # sorted entry i+1 repeats an earlier n-gram
            repeats = bool(same.any())
            if n <= 4 and repeats and _top_chars(words, pos, order, same, n) > self._limits[n] * total:
                return f"quality.top_{n}gram"
            if not repeats:  # then no longer n-gram repeats either, and nothing is left to measure
                return None
            if n >= 4:
                starts = pos[order[1:][same]]  # where an n-gram occurs again
                if n >= 5 and covered(starts, n) > self._limits[n] * total:
                    return f"quality.dup_{n}gram"
                # a longer n-gram can only occur again where this one does: if even 10-word windows from
                # these starts stay under every remaining limit, no later check can fail
                if n < 10 and covered(starts, 10) <= min(self._limits[m] for m in range(max(n + 1, 5), 11)) * total:
                    return None
            member = np.zeros(len(pos), bool)
            member[order[1:][same]] = True
            member[order[:-1][same]] = True
            keep = member & (pos + n < count)
            pos = pos[keep]
            h = h[keep] * _MULT + hashes[pos + n]
        return None


def _top_chars(words: list[str], pos: np.ndarray, order: np.ndarray, same: np.ndarray, n: int) -> int:
    """Count times characters of the most frequent n-gram (some n-gram repeats); ties go to the longest."""
    group = np.concatenate(([0], np.cumsum(~same)))  # group number of each sorted entry
    counts = np.bincount(group)
    top = int(counts.max())
    firsts = np.flatnonzero(np.concatenate(([True], ~same)))  # first sorted entry of each group
    starts = pos[order[firsts[counts == top]]].tolist()
    return top * (max(sum(map(len, words[p:p + n])) for p in starts) + n - 1)
