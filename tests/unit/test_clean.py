"""Cleaning steps on real-looking text: every quality rule fires on a crafted document and not on prose."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import zstandard

from launcher.config import ConfigError, build, dump_toml, field_docs, read_toml
from sharding.clean import (
    STEP_NAMES,
    CleanConfig,
    DecontamConfig,
    Decontaminator,
    NormalizeConfig,
    Normalizer,
    PiiConfig,
    PiiScrubber,
    build_steps,
)
from sharding.documents import Doc, Tally
from sharding.quality import QualityConfig, QualityFilter
from sharding.readers import InputError, ReaderConfig, expand_inputs, read_file
from tests.torture import write_torture_corpus

PROSE = """The lighthouse keeper had kept a log for thirty years, and every entry began with the weather. \
On calm mornings he wrote only a line or two, but when a storm came in from the west he filled whole pages \
with the height of the waves, the sound of the bell buoy, and the names of the boats that had made it home.

His daughter found the logs after he retired. She read them in order, one winter, at the kitchen table, \
and realised that they were less a record of weather than a record of attention: of a man who had decided, \
early on, that noticing things carefully was a kind of duty that he owed to the people at sea.

She later gave the books to the harbour museum, where they sit in a glass case next to a brass telescope. \
Visitors rarely open them, but the curator says that fishermen still come in to look up the night that \
their fathers were caught out in the great gale, and that they usually leave without saying very much."""

_SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "so", "ta", "vi", "de", "po", "ga", "fu", "re", "zi", "xo", "wu")


def words(count: int, start: int = 0) -> list[str]:
    """`count` distinct made-up words (6-8 letters): text with no repetition but the one a test adds."""
    out = []
    for i in range(start, start + count):
        n, word = i + 256, ""
        while n:
            n, digit = divmod(n, 16)
            word += _SYLLABLES[digit]
        out.append(word)
    return out


def filler(count: int, start: int = 0) -> str:
    """Made-up words with 'the' and 'and' in them, so the stop word rule is met."""
    return "the " + " ".join(words(count, start)) + " and"


def check(text: str, **overrides: float) -> str | None:
    return QualityFilter(QualityConfig(**overrides)).check(text)  # type: ignore[arg-type]


def doc(text: str) -> Doc:
    return Doc(text=text, file_index=0, record=0, doc_id="d", group=text)


# --- quality -----------------------------------------------------------------------------------------------------

def test_prose_passes_every_quality_rule() -> None:
    assert check(PROSE) is None
    assert check(filler(300)) is None
    assert check("\n".join(f"- {filler(8, i * 10)}" for i in range(4)) + "\n" + PROSE) is None  # a few bullets


@pytest.mark.parametrize(("text", "reason"), [
    (filler(20), "quality.too_few_words"),
    ("lorem " * 100_001, "quality.too_many_words"),
    ("the and " + " ".join(["ab", "cd", "ef", "g"] * 20), "quality.mean_word_length"),
    ("the and " + " ".join(w * 2 for w in words(60)), "quality.mean_word_length"),
    (filler(60) + " #tag" * 10, "quality.symbol_ratio"),
    (filler(60) + " ..." * 10, "quality.symbol_ratio"),
    (filler(60) + " 1234 5.67 -- 99%" * 5, "quality.alpha_words"),
    (" ".join(words(80)), "quality.stop_words"),
    ("\n".join(f"• {filler(6, i * 10)}" for i in range(20)), "quality.bullet_lines"),
    ("\n".join(filler(8, i * 10) + ("..." if i % 5 < 2 else ".") for i in range(10)), "quality.ellipsis_lines"),
    ("\n".join([filler(10, i * 20) for i in range(10)] + ["Share this page"] * 6), "quality.dup_lines"),
    ("\n".join([filler(40)] * 2 + [filler(10, 100 + i * 20) for i in range(8)]), "quality.dup_line_chars"),
    ("\n\n".join(["\n".join(filler(8, p * 100 + i * 10) for i in range(5)) for p in range(6)] + ["Read more."] * 5),
     "quality.dup_paragraphs"),
])
def test_each_quality_rule_fires_on_a_crafted_document(text: str, reason: str) -> None:
    assert check(text) == reason


def test_repeated_paragraph_characters() -> None:
    paragraphs = [filler(60)] * 2 + [filler(30, 100 + 50 * i) for i in range(3)]
    text = "\n\n".join(paragraphs)
    assert check(text) == "quality.dup_line_chars"  # each paragraph is one line, so the line rule comes first
    assert check(text, max_dup_lines=1.0, max_dup_line_chars=1.0) == "quality.dup_paragraph_chars"


def phrase_doc(phrase: str, times: int, share: float) -> str:
    """`phrase` `times` times between distinct words, then distinct words until its characters are `share` of all."""
    parts = [w for pair in zip(words(times, 5000), [phrase] * times, strict=True) for w in pair]
    text = filler(10) + " " + " ".join(parts)
    extra = 0
    while times * len(phrase) > share * len(text):
        extra += 1
        text += " " + words(1, 9000 + extra)[0]
    return text


@pytest.mark.parametrize(("phrase", "reason"), [
    ("click here", "quality.top_2gram"),  # 2-gram share 0.21 > 0.20
    ("buy cheap pharmaceuticals", "quality.top_3gram"),  # 2-gram share 0.16 (ok), 3-gram 0.19 > 0.18
    ("ok go now pharmaceuticals", "quality.top_4gram"),  # 2-, 3-gram shares 0.14, 0.16 (ok), 4-gram 0.17 > 0.16
])
def test_top_ngram_rules(phrase: str, reason: str) -> None:
    share = {"quality.top_2gram": 0.21, "quality.top_3gram": 0.19, "quality.top_4gram": 0.17}[reason]
    assert check(phrase_doc(phrase, 20, share)) == reason
    assert check(phrase_doc(phrase, 20, share - 0.03)) is None


@pytest.mark.parametrize(("n", "share"), [(5, 0.17), (6, 0.145), (7, 0.135), (8, 0.125), (9, 0.115), (10, 0.105)])
def test_repeated_ngram_rules(n: int, share: float) -> None:
    """A 12-word passage said twice covers the same characters at every n, so each share picks one rule."""
    passage = " ".join(words(12, 7000))
    head, tail = filler(30), list[str]()
    while True:
        text = f"{head} {passage} {' '.join(words(20, 8000))} {passage} {' '.join(tail)}".strip()
        if len(passage.replace(" ", "")) <= share * len(text):
            break
        tail += words(1, 9000 + len(tail))
    assert check(text) == f"quality.dup_{n}gram"
    assert check(text.replace(passage, passage.replace(" ", " x "), 1)) is None  # the first copy broken up


def test_quality_config_checks_name_the_field() -> None:
    with pytest.raises(ValueError, match="^max_dup_5gram must be a fraction"):
        QualityConfig(max_dup_5gram=1.5)
    with pytest.raises(ValueError, match="^min_words must not exceed max_words"):
        QualityConfig(min_words=10, max_words=5)


# --- normalize ---------------------------------------------------------------------------------------------------

def test_normalize_nfc_controls_and_whitespace() -> None:
    tally = Tally()
    d = doc("  Cafe\u0301 cre\u0300me\r\nline  with   runs\tand\ttabs   \r\n\n\n\n\n"
            "    indented\x07 code\u00a0here\x00\ufeff\u2028next\x0cpage \n\n\n")
    assert Normalizer(NormalizeConfig())(d, tally) is None
    assert d.text == "Café crème\nline with runs and tabs\n\n    indented code here\nnext\npage"
    assert tally.modified == {"normalize.nfc": 1, "normalize.control": 1, "normalize.whitespace": 1}


def test_normalize_leaves_clean_text_alone_and_drops_empty() -> None:
    tally = Tally()
    d = doc(PROSE)
    assert Normalizer(NormalizeConfig())(d, tally) is None and d.text == PROSE and not tally.modified
    assert Normalizer(NormalizeConfig())(doc(" \x00\x01\t\n\u00a0 "), tally) == "normalize.empty"


def test_normalize_counts_a_crlf_only_change() -> None:
    tally, d = Tally(), doc("one\r\ntwo")
    Normalizer(NormalizeConfig())(d, tally)
    assert d.text == "one\ntwo" and dict(tally.modified) == {"normalize.control": 1}


def test_normalize_options() -> None:
    d = doc("a  b\n\n\n\nc\u00a0d")
    Normalizer(NormalizeConfig(collapse_spaces=False, unicode_spaces=False, max_blank_lines=2))(d, Tally())
    assert d.text == "a  b\n\n\nc\u00a0d"


# --- pii ---------------------------------------------------------------------------------------------------------

def scrub(text: str, cfg: PiiConfig | None = None) -> tuple[str, Tally]:
    tally, d = Tally(), doc(text)
    assert PiiScrubber(cfg or PiiConfig())(d, tally) is None
    return d.text, tally


def test_pii_placeholders() -> None:
    text, tally = scrub("Write to jane.doe+news@example.co.uk or SUPPORT@Mail.Example.org. Servers 192.168.1.20, "
                        "10.0.0.1 and 2001:db8::ff00:42:8329, fe80::1. Call +1 (555) 123-4567, 555-123-4567, "
                        "(555) 123-4567, 1-800-555-0199, +44 20 7946 0958, +33 6 12 34 56 78, 030 1234567 "
                        "or 06 12 34 56 78.")
    assert text == ("Write to <EMAIL> or <EMAIL>. Servers <IP>, <IP> and <IP>, <IP>. Call <PHONE>, <PHONE>, "
                    "<PHONE>, <PHONE>, <PHONE>, <PHONE>, <PHONE> or <PHONE>.")
    assert tally.modified == {"pii.email": 2, "pii.ip": 4, "pii.phone": 8}


def test_pii_leaves_other_numbers_alone() -> None:
    text = ("In 1999 and 2021-2023, version 3.11.7 (v1.2.3) shipped on 2021-03-04 and 03/04/2021; on 01.02.2023 15 "
            "people came. ISBN 978-3-16-148410-0 and 0-306-40615-2, EAN 9783161484100, order 5551234567, at 12:30:45, "
            "std::vector and a::b, $1,234,567.89, pi is 3.14159265358979, card 4111 1111 1111 1111, "
            "123-45-6789, zip 12345-6789 or MA 02110-1301, DFARS 252.227-7013, ratios 0.25 to 0.125, user@localhost, "
            "300.1.2.3, 1.2.3.4.5.")
    scrubbed, tally = scrub(text)
    assert scrubbed == text and dict(tally.modified) == {}  # dict: a Counter equals another ignoring zero counts


def test_pii_options() -> None:
    text, tally = scrub("mail a@b.org from 8.8.8.8", PiiConfig(email=False, ip_placeholder="[ip]"))
    assert text == "mail a@b.org from [ip]" and tally.modified == {"pii.ip": 1}


# --- decontaminate ---------------------------------------------------------------------------------------------------

EVAL = ("Which planet in the solar system has the longest day, measured as one full rotation relative "
        "to the distant stars, and why does it spin backwards?")


def decontaminator(tmp_path: Path) -> Decontaminator:
    rows = [{"question": EVAL}, {"question": "Name the largest desert on the planet by total area"},
            {"question": "too short to match"}]
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return Decontaminator(DecontamConfig(eval_files=(str(tmp_path / "eval.jsonl"),), text_field="question"))


def test_decontaminate_drops_a_13_gram_and_keeps_a_12_gram(tmp_path: Path) -> None:
    step, tally = decontaminator(tmp_path), Tally()
    eval_words = EVAL.split()
    thirteen = " ".join(eval_words[3:16]).upper().replace(",", " ,")  # case and punctuation do not hide it
    twelve = " ".join(eval_words[3:15])
    assert step(doc(f"{PROSE} {thirteen} {PROSE}"), tally) == "decontam.ngram_overlap"
    assert step(doc(f"{PROSE} {twelve} more words {eval_words[15]} {PROSE}"), tally) is None
    assert step(doc(PROSE), tally) is None


def test_decontaminate_matches_short_eval_texts_whole(tmp_path: Path) -> None:
    step = decontaminator(tmp_path)
    assert step(doc("Quiz: name the largest desert on the planet by total area. Answer: Antarctica."),
                Tally()) == "decontam.ngram_overlap"
    assert step(doc("Name the largest desert on the planet by area"), Tally()) is None  # not the whole sequence
    assert step(doc("This is too short to match anything."), Tally()) is None  # under min_words: ignored


def test_decontaminate_reads_text_and_zst_eval_files(tmp_path: Path) -> None:
    (tmp_path / "eval.txt").write_text(EVAL)
    (tmp_path / "eval.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        json.dumps({"text": PROSE.split("\n\n")[1]}).encode() + b"\n"))
    step = build_steps(CleanConfig(steps=("decontaminate",), decontaminate=DecontamConfig(
        eval_files=(str(tmp_path / "eval.*"),))))[0]
    assert step(doc(EVAL), Tally()) == "decontam.ngram_overlap"
    assert step(doc(PROSE), Tally()) == "decontam.ngram_overlap"
    assert step(doc(PROSE.split("\n\n")[0]), Tally()) is None


def test_decontaminate_refuses_missing_or_empty_eval_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        Decontaminator(DecontamConfig(eval_files=(str(tmp_path / "nope.jsonl"),)))
    (tmp_path / "eval.jsonl").write_text(json.dumps({"question": EVAL}) + "\n")
    with pytest.raises(InputError, match="has no text \\(field 'text'\\)"):
        Decontaminator(DecontamConfig(eval_files=(str(tmp_path / "eval.jsonl"),)))
    assert Decontaminator(DecontamConfig())(doc(EVAL), Tally()) is None  # no eval files: off


# --- the step list -----------------------------------------------------------------------------------------------

def test_build_steps_in_order_and_unknown_names() -> None:
    assert [s.name for s in build_steps(CleanConfig())] == list(STEP_NAMES)
    assert [s.name for s in build_steps(CleanConfig(steps=("pii", "normalize")))] == ["pii", "normalize"]
    with pytest.raises(ValueError, match="^steps must be names from normalize, quality, pii, decontaminate; "
                                         "got 'normalise'$"):
        CleanConfig(steps=("normalise",))


def test_configs_load_through_the_config_loader(tmp_path: Path) -> None:
    docs = {**field_docs(CleanConfig), **field_docs(ReaderConfig)}
    assert all(docs.values()), [k for k, v in docs.items() if not v]
    cfg = build(CleanConfig, {"steps": ["quality"], "quality": {"min_words": 10, "max_dup_5gram": 0.5},
                              "decontaminate": {"eval_files": ["a.jsonl"]}}, "test")
    assert cfg.quality.min_words == 10 and cfg.decontaminate.eval_files == ("a.jsonl",)
    (tmp_path / "c.toml").write_text(dump_toml(cfg, field_docs(CleanConfig)))
    assert build(CleanConfig, read_toml(tmp_path / "c.toml"), "file") == cfg
    with pytest.raises(ConfigError, match="^test: quality.min_alpha_words must be a fraction"):
        build(CleanConfig, {"quality": {"min_alpha_words": 2}}, "test")


def test_reading_and_cleaning_the_torture_corpus_accounts_for_every_record(tmp_path: Path) -> None:
    write_torture_corpus(tmp_path / "corpus")
    tally, steps, kept = Tally(), build_steps(CleanConfig()), 0
    for i, path in enumerate(expand_inputs([str(tmp_path / "corpus")])):
        for d in read_file(path, i, ReaderConfig(), tally):
            reason = next((r for step in steps if (r := step(d, tally))), None)
            if reason:
                tally.drop(reason, f"{path}#{d.record}")
            else:
                kept += 1
    assert tally.docs_in == kept + sum(tally.dropped.values())
    assert tally.dropped["quality.too_few_words"] > 1000  # the short good records
