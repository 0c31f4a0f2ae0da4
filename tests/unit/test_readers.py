"""Readers: exact accounting of every bad input, bounded memory, deterministic input lists, preflight."""

from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from sharding.documents import Doc, Tally
from sharding.readers import InputError, ReaderConfig, expand_inputs, preflight, read_file
from tests.torture import write_torture_corpus


def read_all(paths: list[Path], cfg: ReaderConfig | None = None) -> tuple[list[Doc], Tally]:
    tally = Tally()
    docs = [doc for i, path in enumerate(paths) for doc in read_file(path, i, cfg or ReaderConfig(), tally)]
    return docs, tally


def test_torture_corpus_counts_every_bad_input_exactly(tmp_path: Path) -> None:
    expected = write_torture_corpus(tmp_path / "corpus")
    docs, tally = read_all(expand_inputs([str(tmp_path / "corpus")]))
    reasons = {k: v for k, v in expected.items() if k.startswith("read.")}
    files = {k.removeprefix("files."): v for k, v in expected.items() if k.startswith("files.")}
    assert dict(tally.dropped) == reasons
    assert dict(tally.files) == files
    assert len(docs) == expected["kept"]
    assert tally.docs_in == expected["docs_in"] == len(docs) + sum(tally.dropped.values())
    assert all(doc.text.strip() and "\x00" not in doc.text for doc in docs)
    assert set(tally.samples) == set(reasons)  # every reason shows where it happened
    mixed = str(tmp_path / "corpus" / "mixed.jsonl")
    assert any(s.startswith(f"{mixed}:5: ") for s in tally.samples["read.malformed_json"])  # 1-based line


def test_jsonl_fields_record_numbers_and_ids(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    rows = [{"text": "first", "id": 7, "src": "x"}, {"text": "second"}, {"body": "no text"},
            {"text": "fourth", "src": 3}]
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + "\n".join(json.dumps(r) for r in rows[2:]))
    docs, tally = read_all([path], ReaderConfig(id_field="id", group_field="src"))
    assert [(d.text, d.record, d.doc_id, d.group, d.file_index) for d in docs] == [
        ("first", 0, "7", "x", 0), ("second", 1, "a.jsonl:1", "second", 0), ("fourth", 4, "a.jsonl:4", "3", 0)]
    assert tally.samples["read.missing_text"] == [f"{path}:4: no text field 'text'"]  # 1-based, blank line counted


def test_custom_text_field_and_unused_id_field(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"content": "hello", "text": "not this"}) + "\n")
    docs, _ = read_all([path], ReaderConfig(text_field="content"))
    assert [(d.text, d.doc_id, d.group) for d in docs] == [("hello", "a.jsonl:0", "hello")]


def test_a_10_mb_line_is_skipped_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    path.write_bytes(json.dumps({"text": "y" * 10_000_000}).encode() + b'\n{"text": "after"}\n')
    tracemalloc.start()
    try:
        docs, tally = read_all([path], ReaderConfig(max_doc_bytes=100_000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [d.text for d in docs] == ["after"] and tally.dropped == {"read.too_long": 1}
    assert peak < 2_000_000, f"reading a 10 MB line peaked at {peak} bytes"


def test_zst_reads_every_frame_and_reports_a_cut(tmp_path: Path) -> None:
    body = b"".join(json.dumps({"text": f"record {i} " + "z" * (i % 50)}).encode() + b"\n" for i in range(9000))
    compressor = zstandard.ZstdCompressor(level=3)
    (tmp_path / "whole.jsonl.zst").write_bytes(compressor.compress(body[:30_000]) + compressor.compress(body[30_000:]))
    docs, tally = read_all([tmp_path / "whole.jsonl.zst"])
    assert len(docs) == 9000 and tally.docs_in == 9000 and not tally.dropped and not tally.files
    cut = compressor.compress(body)
    (tmp_path / "cut.jsonl.zst").write_bytes(cut[:-10])  # only the end is missing
    docs, tally = read_all([tmp_path / "cut.jsonl.zst"])
    assert 0 < len(docs) < 9000
    assert tally.dropped == {"read.truncated": 1} and tally.files == {"truncated_zst": 1}
    assert tally.docs_in == len(docs) + 1
    (tmp_path / "header.jsonl.zst").write_bytes(cut[:20])  # cut before the first block ends: truncated, not garbage
    docs, tally = read_all([tmp_path / "header.jsonl.zst"])
    assert docs == [] and tally.dropped == {"read.truncated": 1} and tally.files == {"truncated_zst": 1}


def test_gzip_reads_every_member_and_reports_a_cut_and_garbage(tmp_path: Path) -> None:
    import gzip

    body = b"".join(json.dumps({"text": f"record {i} " + "g" * (i % 50)}).encode() + b"\n" for i in range(9000))
    # Two members (as `cat a.gz b.gz` makes), one named .json.gz as C4 names its gzipped JSON Lines.
    (tmp_path / "whole.jsonl.gz").write_bytes(gzip.compress(body[:30_000]) + gzip.compress(body[30_000:]))
    (tmp_path / "c4.json.gz").write_bytes(gzip.compress(body))
    for name in ("whole.jsonl.gz", "c4.json.gz"):
        docs, tally = read_all([tmp_path / name])
        assert len(docs) == 9000 and tally.docs_in == 9000 and not tally.dropped and not tally.files, name
        assert docs[8999].text.startswith("record 8999 ")
    assert {p.name for p in expand_inputs([str(tmp_path)])} == {"whole.jsonl.gz", "c4.json.gz"}  # a folder's too
    cut = gzip.compress(body)
    (tmp_path / "cut.jsonl.gz").write_bytes(cut[:-10])  # the trailer and the last bytes missing
    docs, tally = read_all([tmp_path / "cut.jsonl.gz"])
    assert 0 < len(docs) < 9000
    assert tally.dropped == {"read.truncated": 1} and tally.files == {"truncated_gz": 1}
    assert tally.docs_in == len(docs) + 1
    (tmp_path / "not.jsonl.gz").write_bytes(b"this is not gzip at all\n" * 100)
    docs, tally = read_all([tmp_path / "not.jsonl.gz"])
    assert docs == [] and tally.files == {"unreadable": 1}


def test_gzip_output_per_read_is_bounded_whatever_the_ratio(tmp_path: Path) -> None:
    import gzip

    from sharding.compressed import GzipRaw

    bomb = gzip.compress(b"a" * 200_000_000)  # 200 MB of one byte: ~200 KB compressed
    with (tmp_path / "bomb.gz").open("wb") as f:
        f.write(bomb)
    tracemalloc.start()
    try:
        with (tmp_path / "bomb.gz").open("rb") as f:
            raw, buffer, total = GzipRaw(f), bytearray(1 << 16), 0
            while n := raw.readinto(buffer):
                total += n
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total == 200_000_000 and peak < 8_000_000, f"peak {peak} bytes"


def test_a_json_file_is_refused_with_the_way_to_jsonl(tmp_path: Path) -> None:
    (tmp_path / "dump.json").write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    with pytest.raises(InputError, match=r"dump.json' is a .json file: give JSON Lines .* jq -c '.\[\]' dump.json"):
        expand_inputs([str(tmp_path / "dump.json")])
    (tmp_path / "notes.txt.gz").write_bytes(b"")
    with pytest.raises(InputError, match="compressed in a format the reader does not know; use .jsonl, .jsonl.zst, "
                                         ".jsonl.gz"):
        expand_inputs([str(tmp_path / "notes.txt.gz")])


def test_parquet_columns_ids_groups_and_missing_text(tmp_path: Path) -> None:
    table = pa.table({"body": ["x", "y"], "key": ["k1", None], "grp": ["g", "g"], "other": [1, 2]})
    pq.write_table(table, tmp_path / "a.parquet")
    docs, _ = read_all([tmp_path / "a.parquet"], ReaderConfig(text_field="body", id_field="key", group_field="grp"))
    assert [(d.text, d.record, d.doc_id, d.group) for d in docs] == [("x", 0, "k1", "g"), ("y", 1, "a.parquet:1", "g")]
    docs, tally = read_all([tmp_path / "a.parquet"])
    assert docs == [] and tally.docs_in == 2 and tally.dropped == {"read.missing_text": 2}
    assert "no column 'text' (columns: body, grp, key, other)" in tally.samples["read.missing_text"][0]


def test_plain_text_is_one_document(tmp_path: Path) -> None:
    path = tmp_path / "COPYING"
    path.write_bytes(b"\xef\xbb\xbfLine one.\r\n\r\nLine two.\n")
    docs, tally = read_all([path])
    assert [(d.text, d.record, d.doc_id) for d in docs] == [("Line one.\r\n\r\nLine two.\n", 0, "COPYING:0")]
    assert tally.docs_in == 1


def test_expand_inputs_files_folders_globs_sorted_and_deduplicated(tmp_path: Path) -> None:
    for name in ("b/2.jsonl", "b/deep/1.parquet", "a.txt", "b/skip.json", "b/.hidden/x.jsonl", "c/x.jsonl.zst"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    got = expand_inputs([str(tmp_path / "b"), str(tmp_path / "*.txt"), str(tmp_path / "b" / "2.jsonl"),
                         str(tmp_path / "c" / "*.zst")])
    assert got == sorted(got)
    assert [p.relative_to(tmp_path).as_posix() for p in got] == ["a.txt", "b/2.jsonl", "b/deep/1.parquet",
                                                                "c/x.jsonl.zst"]
    with pytest.raises(InputError, match="is a .json file"):  # named, it is refused (test_a_json_file_is_refused...)
        expand_inputs([str(tmp_path / "b" / "skip.json")])
    assert expand_inputs([]) == []


@pytest.mark.parametrize(("name", "message"), [
    ("missing.jsonl", "input '{}' does not exist"),
    ("*.nothing", "input '{}' matches no file"),
    ("empty_dir", "input '{}' matches no file (folders are searched for"),
    ("data.txt.gz", "is compressed in a format the reader does not know"),
])
def test_expand_inputs_refuses_what_it_cannot_read(tmp_path: Path, name: str, message: str) -> None:
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty_dir" / "notes.json").write_text("{}")
    (tmp_path / "data.txt.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(InputError) as err:
        expand_inputs([str(tmp_path / name)])
    assert message.format(tmp_path / name) in str(err.value) and "\n" not in str(err.value)


def test_preflight_names_the_fields_it_saw(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"content": "x", "url": "u"}\nnot json\n')
    pq.write_table(pa.table({"body": ["y"]}), tmp_path / "b.parquet")
    (tmp_path / "c.txt").write_text("plain text has no fields to check")
    (tmp_path / "d.jsonl").write_text("")
    paths = expand_inputs([str(tmp_path)])
    with pytest.raises(InputError) as err:
        preflight(paths, ReaderConfig())
    assert str(err.value) == ("text field 'text' is missing from every record sampled in 2 input files; "
                              "set shard.reader.text_field (fields seen: body, content, url)")
    preflight(paths, ReaderConfig(text_field="content"))  # present in one file is enough
    with pytest.raises(InputError, match="^group field 'site' is missing .* set shard.reader.group_field"):
        preflight(paths, ReaderConfig(text_field="content", group_field="site"))


def test_preflight_samples_only_the_start(tmp_path: Path) -> None:
    lines = [json.dumps({"other": i}) for i in range(200)] + [json.dumps({"text": "late"})]
    (tmp_path / "a.jsonl").write_text("\n".join(lines))
    with pytest.raises(InputError):
        preflight([tmp_path / "a.jsonl"], ReaderConfig(), sample=100)
    preflight([tmp_path / "a.jsonl"], ReaderConfig(), sample=1000)


def test_reader_config_checks_name_the_field() -> None:
    with pytest.raises(ValueError, match="^max_doc_bytes must be at least 1"):
        ReaderConfig(max_doc_bytes=0)
    with pytest.raises(ValueError, match="^text_field must not be empty"):
        ReaderConfig(text_field="")


def test_a_glob_over_many_files_is_expanded_without_a_stat_per_file(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Every map element expands the inputs: on a shared filesystem a stat per file per element is N x world
    metadata calls. Folders among the matches are still searched."""
    for i in range(200):
        (tmp_path / f"part-{i:03d}.jsonl").write_text("")
    (tmp_path / "more.jsonl").mkdir()  # a folder whose name matches the glob
    (tmp_path / "more.jsonl" / "inner.jsonl").write_text("")
    calls = []
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda *a, **k: calls.append(a[0]) or real_stat(*a, **k))
    files = expand_inputs([str(tmp_path / "*.jsonl")])
    monkeypatch.undo()
    assert len(files) == 201 and tmp_path / "more.jsonl" / "inner.jsonl" in files
    assert len(calls) < 20, f"{len(calls)} stat calls for 200 files"
