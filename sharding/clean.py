"""Cleaning: an ordered list of small steps, each keeping, rewriting or dropping one document.

A step has a `name` and is called as `step(doc, tally)`: it returns a drop reason ("<step>.<rule>")
or None to keep the document, may rewrite `doc.text` in place, and counts its edits in
`tally.modified` (for normalize.*: documents changed; for pii.*: matches replaced). The caller
records drops, so a step never calls `tally.drop` itself.

Steps: normalize (Unicode NFC, control characters, whitespace), quality (Gopher rules, in
sharding/quality.py), pii (e-mail, IP and phone placeholders) and decontaminate (drop documents
sharing a word n-gram with benchmark texts, as GPT-3 did).
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections.abc import Callable
from typing import Protocol

import numpy as np

from sharding.config import STEP_NAMES, CleanConfig, DecontamConfig, NormalizeConfig, PiiConfig
from sharding.documents import Doc, Tally
from sharding.quality import QualityFilter, ngram_hashes, word_hashes
from sharding.readers import InputError, ReaderConfig, expand_inputs, read_file


class Step(Protocol):
    name: str

    def __call__(self, doc: Doc, tally: Tally) -> str | None: ...


# --- normalize -------------------------------------------------------------------------------------------------------

# These start with a character class or a literal, never a lookbehind: re then jumps from candidate to candidate
# instead of trying the whole pattern at every position (2-5x faster on prose). PII patterns get a cheap hint instead.
_LINE_BREAKS = re.compile(r"[\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")  # what str.splitlines() breaks on, but \n
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1b\x1f\x7f-\x84\x86-\x9f\ufeff]")  # Cc but \t \n and the breaks above; BOM
_UNICODE_SPACES = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_TRAILING = re.compile(r"[ \t]+(?=\n)")
_INNER_RUN = re.compile(r"[ \t](?<=\S[ \t])(?:[ \t]+|(?<=\t))")  # 2+ blanks or a tab after a visible character
_INNER_SPACES = re.compile(r"  (?<=\S  ) *")  # the same without tabs: its literal start makes it 4x faster


class Normalizer:
    name = "normalize"

    def __init__(self, cfg: NormalizeConfig) -> None:
        self.cfg = cfg
        self._blank = re.compile("\n{" + str(cfg.max_blank_lines + 2) + ",}")
        self._blank_to = "\n" * (cfg.max_blank_lines + 1)

    def __call__(self, doc: Doc, tally: Tally) -> str | None:
        cfg, text = self.cfg, doc.text
        if cfg.nfc and not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
            tally.modified["normalize.nfc"] += 1
        if cfg.strip_control:
            unix = text.replace("\r\n", "\n")
            crlf, text = len(unix) != len(text), unix
            text, breaks = _LINE_BREAKS.subn("\n", text)
            text, controls = _CONTROL.subn("", text)
            if crlf or breaks or controls:
                tally.modified["normalize.control"] += 1
        before = text
        if cfg.unicode_spaces and not text.isascii():
            text = _UNICODE_SPACES.sub(" ", text)
        if " \n" in text or "\t\n" in text:  # the substring test is ~10x faster than the regex finding nothing
            text = _TRAILING.sub("", text)
        if cfg.collapse_spaces and "\t" in text:
            text = _INNER_RUN.sub(" ", text)
        elif cfg.collapse_spaces and "  " in text:
            text = _INNER_SPACES.sub(" ", text)
        if self._blank_to + "\n" in text:
            text = self._blank.sub(self._blank_to, text)
        text = text.strip()
        if text != before:
            tally.modified["normalize.whitespace"] += 1
        doc.text = text
        return None if text else "normalize.empty"


# --- pii -------------------------------------------------------------------------------------------------------------

_EMAIL = re.compile(r"(?<![\w.%+-])[\w.%+-]+@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}\b")
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(rf"(?<![\w.])(?<!version )(?:{_OCTET}\.){{3}}{_OCTET}(?!\w|\.[0-9])")
_IPV4_HINT = re.compile(r"[0-9]\.[0-9]{1,3}\.[0-9]")
_IPV6_HINT = re.compile(r":[0-9A-Fa-f]{1,4}:")  # a full IPv6 address has it, a shortened one has "::"
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?!\w|[:.][0-9A-Fa-f])")
# Three shapes, each with separators a phone number has and a date, year, version, ISBN or plain digit run lacks.
# The digit count is checked after the match (_phone_ok). Its leading lookbehind makes it slow, hence the hint.
_PHONE_HINT = re.compile(r"[0-9][ .)/-]{1,2}[0-9]{2,}[ .-]?[0-9]{2}")
_PHONE = re.compile(r"""
    (?<![\w+.-])
    (?: (?P<intl> \+[1-9][0-9]{0,2} [ .-]? (?:\([0-9]{1,4}\)[ .-]?)? [0-9]{1,4} (?:[ .-]?[0-9]{2,4}){1,4} )
      | (?P<us> (?:1[ .-])? (?: \([2-9][0-9]{2}\)[ ]?[0-9]{3}[ .-]
                          | [2-9][0-9]{2}(?P<sep>[ .-])[0-9]{3}(?P=sep) ) [0-9]{4} )  # not 252.227-7013
      | (?P<national> 0[1-9][0-9]{0,3} (?:[ /.-][0-9]{2,8}){1,4} )
    )
    (?![\w]|[.:/-][0-9])
""", re.VERBOSE)


_NOT_NATIONAL = re.compile(r"[0-9]{1,2}([./-])[0-9]{1,2}\1[0-9]{2,4}\b|[0-9]{5}-[0-9]{4}$")  # a date, a ZIP+4


def _phone_ok(match: re.Match[str]) -> bool:
    digits = sum(c.isdigit() for c in match[0])
    if match["intl"]:
        return 8 <= digits <= 15
    if match["us"]:
        return digits in (10, 11)
    return 9 <= digits <= 12 and not _NOT_NATIONAL.match(match[0])  # "01.02.2023 15" is a date and a number


def _ipv6_ok(match: re.Match[str]) -> bool:
    # "::" alone and hex-only words joined by colons are C++/Rust paths more often than addresses
    if not any(c.isdigit() for c in match[0]):
        return False
    try:
        ipaddress.IPv6Address(match[0])
    except ValueError:
        return False
    return True


class PiiScrubber:
    """Replaces personal data with placeholders; never drops a document."""

    name = "pii"

    def __init__(self, cfg: PiiConfig) -> None:
        self.cfg = cfg

    def __call__(self, doc: Doc, tally: Tally) -> str | None:
        cfg, text = self.cfg, doc.text
        if cfg.email and "@" in text:
            text, n = _EMAIL.subn(cfg.email_placeholder, text)
            if n:  # a Counter keeps keys added with 0, and the summary would list them
                tally.modified["pii.email"] += n
        if cfg.ip:
            if _IPV4_HINT.search(text):
                text, n = _IPV4.subn(cfg.ip_placeholder, text)
                if n:
                    tally.modified["pii.ip"] += n
            if "::" in text or _IPV6_HINT.search(text):
                text = self._sub(_IPV6, _ipv6_ok, cfg.ip_placeholder, "pii.ip", text, tally)
        if cfg.phone and _PHONE_HINT.search(text):
            text = self._sub(_PHONE, _phone_ok, cfg.phone_placeholder, "pii.phone", text, tally)
        doc.text = text
        return None

    @staticmethod
    def _sub(pattern: re.Pattern[str], ok: Callable[[re.Match[str]], bool], placeholder: str, key: str, text: str,
             tally: Tally) -> str:
        def replace(match: re.Match[str]) -> str:
            if not ok(match):
                return match[0]
            tally.modified[key] += 1
            return placeholder

        return pattern.sub(replace, text)


# --- decontaminate ---------------------------------------------------------------------------------------------------

_DECONTAM_WORD = re.compile(r"\w+")


def decontam_words(text: str) -> list[str]:
    """Lower-cased runs of letters and digits: punctuation and spacing differences must not hide a match."""
    return _DECONTAM_WORD.findall(text.lower())


class Decontaminator:
    """Drops documents sharing a word n-gram with an eval text (decontam.ngram_overlap).

    The eval n-grams are hashed once at construction; hashes are salted per process, which is fine
    because documents are hashed by the same process.
    """

    name = "decontaminate"

    def __init__(self, cfg: DecontamConfig, text_field: str = "text") -> None:
        self.cfg = cfg
        by_length: dict[int, list[np.ndarray]] = {}
        reader = ReaderConfig(text_field=cfg.text_field or text_field, max_doc_bytes=1 << 40)
        for index, path in enumerate(expand_inputs(cfg.eval_files) if cfg.eval_files else []):
            texts = 0
            for doc in read_file(path, index, reader, Tally()):
                texts += 1
                hashes = word_hashes(decontam_words(doc.text))
                n = min(cfg.ngram, len(hashes))
                if n >= cfg.min_words:
                    by_length.setdefault(n, []).append(ngram_hashes(hashes, n))
            if not texts:
                raise InputError(f"eval file '{path}' has no text (field '{reader.text_field}')")
        # n -> sorted unique hashes: searchsorted on them is O(log size) per window, and memory-compact
        self._tables = {n: np.unique(np.concatenate(parts)) for n, parts in sorted(by_length.items())}

    def __call__(self, doc: Doc, tally: Tally) -> str | None:
        if not self._tables:
            return None
        hashes = word_hashes(decontam_words(doc.text))
        for n, table in self._tables.items():
            windows = ngram_hashes(hashes, n)
            if len(windows):
                at = np.searchsorted(table, windows).clip(max=len(table) - 1)
                if (table[at] == windows).any():
                    return "decontam.ngram_overlap"
        return None


# --- the step list ---------------------------------------------------------------------------------------------------

def build_steps(cfg: CleanConfig, text_field: str = "text") -> list[Step]:
    """The configured steps, in order. `text_field` is the reader's, for JSONL eval files."""
    steps: list[Step] = []
    for name in cfg.steps:
        if name == "normalize":
            steps.append(Normalizer(cfg.normalize))
        elif name == "quality":
            steps.append(QualityFilter(cfg.quality))
        elif name == "pii":
            steps.append(PiiScrubber(cfg.pii))
        elif name == "decontaminate":
            steps.append(Decontaminator(cfg.decontaminate, text_field))
        else:
            raise ValueError(f"unknown cleaning step '{name}'; valid steps: {', '.join(STEP_NAMES)}")
    return steps
