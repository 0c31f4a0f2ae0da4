"""A corpus holding every kind of bad input the readers must survive, with the exact counts expected.

`write_torture_corpus(folder)` returns {key: count} where a key is a drop reason ("read.*"),
"kept" (documents yielded), "docs_in", or "files.<event>" (Tally.files). Reading every file of the
folder with the default ReaderConfig must give exactly these numbers.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

GOOD_TEXT = "A perfectly ordinary document number {i}, with some words in it."


def _good(i: int, **extra: object) -> bytes:
    return json.dumps({"id": f"doc-{i}", "text": GOOD_TEXT.format(i=i), "src": f"site-{i % 3}", **extra}).encode()


def _complete_lines_after_cut(cut: bytes) -> int:
    """Newlines a decompressor recovers from a cut-off zstd stream: the records a reader can still yield."""
    return zstandard.ZstdDecompressor().decompressobj().decompress(cut).count(b"\n")


def write_torture_corpus(folder: Path) -> dict[str, int]:
    folder.mkdir(parents=True, exist_ok=True)
    expect: Counter[str] = Counter()

    # JSONL with one of every bad line between good ones, a BOM, CRLF endings and a cut-off last line
    lines = [b"\xef\xbb\xbf" + _good(0), _good(1) + b"\r", b"", b"   \t",
             b'{"text": "unterminated string', b"{'text': 'single quotes'}",  # read.malformed_json x2
             b"[" * 100_000 + b"]" * 100_000,  # nesting deep enough to exhaust the parser: malformed, not a crash
             b'["a", "json", "array"]', b'"just a string"', b"42",  # read.not_an_object x3
             b'{"text": "caf\xe9 latin-1"}', b'{"text": "lone \\ud800 surrogate"}',  # read.invalid_utf8 x2
             b'{"text": "raw \x00 NUL"}', b'{"text": "escaped \\u0000 NUL"}',  # read.nul_bytes x2
             b'{"body": "no text key"}', b'{"text": 5}', b'{"text": null}',  # read.missing_text x3
             b'{"text": ""}', b'{"text": " \\n\\t "}',  # read.empty_text x2
             _good(2)]
    (folder / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n" + b'{"text": "the writer died in the mid')
    expect.update({"kept": 3, "read.malformed_json": 3, "read.not_an_object": 3, "read.invalid_utf8": 2,
                   "read.nul_bytes": 2, "read.missing_text": 3, "read.empty_text": 2, "read.truncated": 1,
                   "files.partial_last_line": 1})

    # a 10 MB single line between two good records; the last record lacks its newline but is complete
    big = json.dumps({"text": "x" * 10_000_000}).encode()
    (folder / "big.jsonl").write_bytes(_good(3) + b"\n" + big + b"\n" + _good(4))
    expect.update({"kept": 2, "read.too_long": 1})

    (folder / "empty.jsonl").write_bytes(b"")
    (folder / "blank.jsonl").write_bytes(b"\n\n  \n")
    expect.update({"files.empty": 2})

    # zstd: two frames (a concatenation, as pzstd and appenders write), then a copy cut short, then garbage
    frame = zstandard.ZstdCompressor()
    (folder / "frames.jsonl.zst").write_bytes(frame.compress(b"\n".join(_good(i) for i in range(10, 15)) + b"\n") +
                                              frame.compress(b"\n".join(_good(i) for i in range(15, 20)) + b"\n"))
    expect.update({"kept": 10})
    whole = frame.compress(b"".join(_good(i, pad=f"{i:08d}" * 40) + b"\n" for i in range(3000)))
    cut = whole[: len(whole) * 2 // 3]
    (folder / "cut.jsonl.zst").write_bytes(cut)
    recoverable = _complete_lines_after_cut(cut)
    assert 0 < recoverable < 3000, recoverable  # the cut must fall inside the data for the test to mean anything
    expect.update({"kept": recoverable, "read.truncated": 1, "files.truncated_zst": 1})
    (folder / "garbage.jsonl.zst").write_bytes(b"this was never zstd\n" * 10)
    expect.update({"files.unreadable": 1})

    # Parquet: good rows with bad values, a file without the text column, a corrupt one, a damaged data page
    pq.write_table(pa.table({"text": [GOOD_TEXT.format(i=i) for i in range(5)] + [None, "", "nul \x00 inside"],
                             "id": list(range(8))}), folder / "rows.parquet")
    expect.update({"kept": 5, "read.missing_text": 1, "read.empty_text": 1, "read.nul_bytes": 1})
    pq.write_table(pa.table({"body": ["a", "b", "c", "d"]}), folder / "no_text.parquet")
    expect.update({"read.missing_text": 4})
    (folder / "corrupt.parquet").write_bytes(b"PAR1" + b"\x13" * 64 + b"PAR1")
    expect.update({"files.unreadable": 1})
    sink = io.BytesIO()
    pq.write_table(pa.table({"text": ["one", "two", "three"]}), sink, compression="none")
    data = sink.getvalue()
    (folder / "damaged.parquet").write_bytes(data[:4] + b"\x00" * 20 + data[24:])  # page header zeroed, footer intact
    expect.update({"files.unreadable": 1, "read.unreadable": 3})

    # plain text: one document per file
    (folder / "notes.txt").write_text("A plain text file is a single document.\n\nEven with paragraphs.\n")
    (folder / "readme.md").write_bytes(b"\xef\xbb\xbf# Title\n\nMarkdown is plain text too.\n")
    expect.update({"kept": 2})
    (folder / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (folder / "latin1.rst").write_bytes("Café au lait".encode("latin-1"))
    (folder / "spaces.txt").write_bytes(b"   \n\n\t  \n")
    (folder / "huge.txt").write_bytes(b"word " * 500_000)  # 2.5 MB: over the 2 MB default
    expect.update({"read.nul_bytes": 1, "read.invalid_utf8": 1, "read.empty_text": 1, "read.too_long": 1})

    # files the folder walk must skip
    (folder / ".hidden.jsonl").write_bytes(_good(99) + b"\n")
    (folder / "LICENSE").write_text("not picked up from a folder")

    drops = sum(v for k, v in expect.items() if k.startswith("read."))
    expect["docs_in"] = expect["kept"] + drops
    return dict(expect)
