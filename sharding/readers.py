"""Input files -> `Doc` records, streaming, with every bad record counted under a named reason.

Formats, chosen by the file name: `*.jsonl`, `*.jsonl.zst`, `*.jsonl.gz` and `*.json.gz` (one JSON object per line;
C4 and others call gzipped JSON Lines `.json.gz`; a plain `.json` file is refused, being most often one array),
`*.parquet`, and anything else is plain UTF-8 text holding one document (record 0). A folder
stands for the `*.jsonl`, `*.jsonl.zst`, `*.parquet`, `*.txt`, `*.md` and `*.rst` files below it
(hidden ones skipped); other plain-text names must be given as a file or a glob.

Memory stays bounded whatever the input: JSONL is read line by line with a size cap, zstd is
decompressed in small steps, Parquet batch by batch (so one row group at a time at most), and a
text file bigger than `max_doc_bytes` is never read. A record that cannot become a document is
dropped with one of READ_REASONS; content problems never raise, I/O errors do (a requeue retries).
Drop locations are `path:line` for JSONL (1-based, as editors count) and `path#row` for Parquet.

A reader can be given one `Piece` of a large file (`sharding.units` plans them): a JSONL piece reads the lines
that start in its byte range, and locates them as `path@byte` (the line's first byte: a piece does not know how
many lines come before it); a Parquet piece reads its share of the row groups, rows numbered as in the whole file.
"""

from __future__ import annotations

import glob
import io
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from common.missing import MissingInput
from sharding.compressed import GzipRaw, Truncated, ZstdRaw
from sharding.config import ReaderConfig
from sharding.documents import Doc, Tally

READ_REASONS = ("read.malformed_json", "read.not_an_object", "read.invalid_utf8", "read.nul_bytes", "read.too_long",
                "read.missing_text", "read.empty_text", "read.truncated", "read.unreadable")
FOLDER_SUFFIXES = (".jsonl", ".jsonl.zst", ".jsonl.gz", ".json.gz", ".parquet", ".txt", ".md", ".rst")
# Compressed inputs we cannot read: reading them as plain text would drop them one by one instead of failing early.
UNSUPPORTED_SUFFIXES = (".gz", ".bz2", ".xz", ".zip", ".zst", ".lz4", ".7z", ".tar")
_SKIP_CHUNK = 1 << 16  # bytes read at a time while skipping the rest of an over-long line
_PARQUET_BATCH = 256  # rows per Parquet batch


class InputError(ValueError):
    """The inputs cannot be used as given: one line, raised before any work starts."""


class InputMissing(InputError, MissingInput):
    """An input pattern that names or matches nothing."""


@dataclass(frozen=True)
class Piece:
    """Which part of an input file to read (`sharding.units`); count 1: the whole file."""

    index: int  # 0-based
    count: int  # pieces of the file
    start: int  # JSONL: the lines starting at byte offsets in [start, stop); Parquet: row groups by index share
    stop: int

    @property
    def split(self) -> bool:
        return self.count > 1


WHOLE = Piece(0, 1, 0, 0)


def splittable(path: str | Path) -> bool:
    """Whether a file can be read in pieces: JSONL and Parquet (zstd has no seek table; text is one document)."""
    return _kind(Path(path)) in ("jsonl", "parquet")


# --- finding the inputs ---------------------------------------------------------------------------------------------

def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".json.gz"):
        return "jsonl.gz"
    return next((kind for kind in ("jsonl.zst", "jsonl.gz", "jsonl", "parquet") if name.endswith("." + kind)), "text")


def _in_folder(folder: Path) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(root, f) for f in files if not f.startswith(".") and f.lower().endswith(FOLDER_SUFFIXES)]
    return found


def expand_inputs(patterns: Sequence[str]) -> list[Path]:
    """Files, folders and globs -> the sorted, de-duplicated absolute paths of the input files.

    The order is the global document order (Doc.file_index), so it must not depend on the file system.
    """
    paths: set[Path] = set()
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if glob.has_magic(expanded):
            matches = [Path(m) for m in glob.glob(expanded, recursive=True)]
            if not matches:
                raise InputMissing(f"input '{pattern}' matches no file")
            # The same glob with a trailing separator matches only folders, told apart by the directory listing:
            # no stat per match, which every map element would otherwise pay for every input file.
            folders = {Path(m) for m in glob.glob(os.path.join(expanded, ""), recursive=True)}
        elif os.path.exists(expanded):
            matches = [Path(expanded)]
            folders = {Path(expanded)} if os.path.isdir(expanded) else set()
        else:
            raise InputMissing(f"input '{pattern}' does not exist")
        found = [f for m in matches for f in (_in_folder(m) if m in folders else [m])]
        if not found:
            raise InputMissing(f"input '{pattern}' matches no file (folders are searched for "
                             f"{', '.join('*' + s for s in FOLDER_SUFFIXES)})")
        for f in found:
            if _kind(f) == "text" and f.name.lower().endswith(UNSUPPORTED_SUFFIXES):
                raise InputError(f"input '{f}' is compressed in a format the reader does not know; "
                                 "use .jsonl, .jsonl.zst, .jsonl.gz, .parquet or plain text")
            if f.name.lower().endswith(".json"):  # read as plain text it would be one document of JSON syntax
                raise InputError(f"input '{f}' is a .json file: give JSON Lines (one object per line) named .jsonl; "
                                 f"a JSON array converts with: jq -c '.[]' {f.name} > {f.stem}.jsonl")
        paths.update(Path(os.path.abspath(f)) for f in found)
    return sorted(paths)


# --- JSONL -----------------------------------------------------------------------------------------------------------

def _next_line_start(raw: BinaryIO, offset: int) -> int:
    """The first line start at or after `offset` > 0, found reading a chunk at a time (the line that `offset`
    falls inside may be far longer than any limit)."""
    raw.seek(offset - 1)
    while (chunk := raw.readline(_SKIP_CHUNK)) and not chunk.endswith(b"\n"):
        pass
    return raw.tell()


def _lines(path: Path, limit: int, tally: Tally, piece: Piece = WHOLE) -> Iterator[tuple[int, bytes, bool]]:
    """(record, line, is the last line without a newline) of a JSONL file, blank lines skipped. The record is the
    0-based line number, or in a piece of a split file the byte offset of the line's start.

    Lines over `limit` bytes are counted and dropped here without ever being held whole.
    """
    split = piece.split
    with open(path, "rb") as raw:
        kind = _kind(path)
        zst = ZstdRaw(raw) if kind == "jsonl.zst" else GzipRaw(raw) if kind == "jsonl.gz" else None
        stream: BinaryIO = io.BufferedReader(zst, 1 << 16) if zst else raw  # type: ignore[assignment]
        pos = _next_line_start(raw, piece.start) if split and piece.start else 0
        stop = piece.stop if split else None
        number, records = -1, 0
        try:
            while (stop is None or pos < stop) and (line := stream.readline(limit + 1)):
                number += 1
                record, first = (pos if split else number), pos == 0
                pos += len(line)
                if len(line) > limit and not line.endswith(b"\n"):
                    while (rest := stream.readline(_SKIP_CHUNK)) and not rest.endswith(b"\n"):
                        pos += len(rest)
                    pos += len(rest)
                    records += 1
                    tally.docs_in += 1
                    tally.drop("read.too_long", location(path, record, split), f"line longer than {limit} bytes")
                    continue
                if first and line.startswith(b"\xef\xbb\xbf"):
                    line = line[3:]
                if line.isspace() or not line:
                    continue
                records += 1
                yield record, line, not line.endswith(b"\n")
        except Truncated as e:
            if e.corrupt and zst is not None and zst.produced == 0:  # not zstd (or gzip) at all
                tally.files["unreadable"] += 1
                _warn(path, f"unreadable, skipped: {_brief(e)}")
                return
            records += 1
            tally.docs_in += 1
            tally.files["truncated_zst" if kind == "jsonl.zst" else "truncated_gz"] += 1
            tally.drop("read.truncated", f"{path}:{number + 2}", _brief(e))
    if records == 0 and not split:  # a piece can hold no line start; the file itself is not empty
        tally.files["empty"] += 1


def _parse(line: bytes) -> tuple[Any, str, str]:
    """(object, "", "") or (None, reason, detail) for one JSONL line."""
    if b"\x00" in line:
        return None, "read.nul_bytes", "NUL byte in the line"
    try:
        obj = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        return None, "read.invalid_utf8", _brief(e)
    except (ValueError, RecursionError) as e:
        return None, "read.malformed_json", _brief(e)
    if not isinstance(obj, dict):
        return None, "read.not_an_object", f"a JSON {type(obj).__name__}, not an object"
    return obj, "", ""


def _check_text(text: Any, field: str, may_have_escapes: bool = True) -> tuple[str, str]:
    """("", "") when `text` can be a document, else (reason, detail)."""
    if not isinstance(text, str):
        return "read.missing_text", f"no text field '{field}'" if text is None else f"'{field}' is not a string"
    if not text or text.isspace():
        return "read.empty_text", ""
    if "\x00" in text:
        return "read.nul_bytes", "NUL character in the text"
    if may_have_escapes and not text.isascii():
        try:  # JSON escapes can spell lone surrogates, which no tokenizer or file accepts
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            return "read.invalid_utf8", _brief(e)
    return "", ""


def _doc(text: str, obj: dict[str, Any], cfg: ReaderConfig, path: Path, file_index: int, record: int) -> Doc:
    doc_id = obj.get(cfg.id_field) if cfg.id_field else None
    group = obj.get(cfg.group_field) if cfg.group_field else None
    return Doc(text=text, file_index=file_index, record=record,
               doc_id=f"{path.name}:{record}" if doc_id is None else str(doc_id),
               group=text if group is None else str(group))


def _read_jsonl(path: Path, file_index: int, cfg: ReaderConfig, tally: Tally,
                piece: Piece) -> Iterator[Doc]:
    split = piece.split
    for record, line, last_without_newline in _lines(path, cfg.max_doc_bytes, tally, piece):
        tally.docs_in += 1
        where = location(path, record, split)
        obj, reason, detail = _parse(line)
        if obj is None:
            if last_without_newline and reason in ("read.malformed_json", "read.invalid_utf8"):  # may be cut mid-char
                reason = "read.truncated"
                tally.files["partial_last_line"] += 1
            tally.drop(reason, where, detail)
            continue
        text = obj.get(cfg.text_field)
        reason, detail = _check_text(text, cfg.text_field, b"\\u" in line or b"\\U" in line)
        if reason:
            tally.drop(reason, where, detail)
            continue
        yield _doc(text, obj, cfg, path, file_index, record)


# --- Parquet and plain text ------------------------------------------------------------------------------------------

def _read_parquet(path: Path, file_index: int, cfg: ReaderConfig, tally: Tally,
                  piece: Piece) -> Iterator[Doc]:
    with open(path, "rb"):
        pass  # a missing or unreadable file is an I/O error that raises, not a corrupt file to skip
    split = piece.split
    try:
        pf = pq.ParquetFile(path)
        meta = pf.metadata
        groups = range(meta.num_row_groups)
        if split:  # this piece's share of the row groups, by index
            groups = range(piece.index * len(groups) // piece.count, (piece.index + 1) * len(groups) // piece.count)
        first = sum(meta.row_group(g).num_rows for g in range(groups.start))
        rows = sum(meta.row_group(g).num_rows for g in groups)
    except (pa.ArrowException, OSError) as e:
        if piece.index == 0:  # the file's problem: counted once, by its first piece
            tally.files["unreadable"] += 1
            _warn(path, f"unreadable, skipped: {_brief(e)}")
        return
    if rows == 0:
        if not split:
            tally.files["empty"] += 1
        return
    names = set(pf.schema_arrow.names)
    if cfg.text_field not in names:
        tally.docs_in += rows  # one drop call for all rows: a big file would otherwise cost millions of calls
        tally.drop("read.missing_text", f"{path}#{first}", f"no column '{cfg.text_field}' (columns: {_listed(names)})")
        tally.dropped["read.missing_text"] += rows - 1
        return
    columns = [c for c in dict.fromkeys((cfg.text_field, cfg.id_field, cfg.group_field)) if c in names]
    row = first
    try:
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH, columns=columns, row_groups=list(groups)):
            values = {name: _values(batch.column(name)) for name in columns}
            for i, text in enumerate(values[cfg.text_field]):
                tally.docs_in += 1
                if isinstance(text, bytes):
                    try:
                        text = text.decode("utf-8")
                    except UnicodeDecodeError as e:
                        tally.drop("read.invalid_utf8", f"{path}#{row + i}", _brief(e))
                        continue
                if isinstance(text, str) and len(text) * 4 > cfg.max_doc_bytes and \
                        len(text.encode("utf-8", "surrogatepass")) > cfg.max_doc_bytes:
                    tally.drop("read.too_long", f"{path}#{row + i}", f"text longer than {cfg.max_doc_bytes} bytes")
                    continue
                reason, detail = _check_text(text, cfg.text_field, may_have_escapes=False)
                if reason:
                    tally.drop(reason, f"{path}#{row + i}", detail)
                    continue
                yield _doc(text, {name: v[i] for name, v in values.items()}, cfg, path, file_index, row + i)
            row += batch.num_rows
    except (pa.ArrowException, OSError) as e:
        tally.files["unreadable"] += 1
        lost = max(0, first + rows - row)  # the metadata knows how many rows were lost
        _warn(path, f"unreadable after row {row}, {lost} rows lost: {_brief(e)}")
        if lost:
            tally.docs_in += lost
            tally.drop("read.unreadable", f"{path}#{row}", f"{lost} rows lost: {_brief(e)}")
            tally.dropped["read.unreadable"] += lost - 1


def _values(column: pa.Array) -> list[Any]:
    try:
        return column.to_pylist()  # type: ignore[no-any-return]
    except UnicodeDecodeError:  # a string column holding invalid UTF-8: decode value by value, drop the bad ones
        return column.cast(pa.binary()).to_pylist()  # type: ignore[no-any-return]


def _read_text(path: Path, file_index: int, cfg: ReaderConfig, tally: Tally) -> Iterator[Doc]:
    size = path.stat().st_size
    if size == 0:
        tally.files["empty"] += 1
        return
    tally.docs_in += 1
    if size > cfg.max_doc_bytes:
        tally.drop("read.too_long", str(path), f"{size} bytes")
        return
    data = path.read_bytes()
    if b"\x00" in data:
        tally.drop("read.nul_bytes", str(path), "NUL byte in the file")
        return
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        tally.drop("read.invalid_utf8", str(path), _brief(e))
        return
    reason, detail = _check_text(text, cfg.text_field, may_have_escapes=False)
    if reason:
        tally.drop(reason, str(path), detail)
        return
    yield Doc(text=text, file_index=file_index, record=0, doc_id=f"{path.name}:0", group=text)


def location(path: Path, record: int, split: bool = False) -> str:
    """Where a record is, as drop samples show it: `path:line` (1-based) for JSONL, `path#row` otherwise, and
    `path@byte` for a line of a split JSONL file (`tail -c +$((byte + 1)) path | head -1` prints it)."""
    if _kind(path) in ("parquet", "text"):
        return f"{path}#{record}"
    return f"{path}@{record}" if split else f"{path}:{record + 1}"


def read_file(path: Path, file_index: int, cfg: ReaderConfig, tally: Tally,
              piece: Piece = WHOLE) -> Iterator[Doc]:
    """The documents of one input file (or of one `piece` of it), in record order; everything else is counted
    in `tally`.

    Every record read adds one to `tally.docs_in`, and is either yielded or dropped under a reason.
    """
    kind = _kind(path)
    if kind == "parquet":
        yield from _read_parquet(path, file_index, cfg, tally, piece)
    elif kind == "text":
        yield from _read_text(path, file_index, cfg, tally)  # never split: one document
    else:
        yield from _read_jsonl(path, file_index, cfg, tally, piece)


# --- checks before any job is submitted -----------------------------------------------------------------------------

def _listed(names: set[str], most: int = 12) -> str:
    shown = sorted(names)
    return ", ".join(shown[:most]) + (f", ... ({len(shown)} in all)" if len(shown) > most else "") or "none"


def _sampled_fields(path: Path, cfg: ReaderConfig, sample: int) -> list[set[str]]:
    """The key sets of up to `sample` JSON objects (one set, the columns, for Parquet); [] when none could be read."""
    if _kind(path) == "parquet":
        try:
            return [set(pq.ParquetFile(path).schema_arrow.names)]
        except (pa.ArrowException, OSError):
            return []
    seen = []
    for count, (_, line, _) in enumerate(_lines(path, cfg.max_doc_bytes, Tally()), 1):
        obj, _, _ = _parse(line)
        if obj is not None:
            seen.append(set(obj))
        if count >= sample:
            break
    return seen


def preflight(paths: Sequence[Path], cfg: ReaderConfig, sample: int = 100) -> None:
    """Cheap check that the configured fields exist: raises InputError when a field is in no sampled record.

    Only JSONL and Parquet files are sampled (plain text has no fields); empty and corrupt files are
    left to the reader, which counts them.
    """
    samples: list[list[set[str]]] = []
    for path in paths:
        if _kind(path) == "text":
            continue
        try:
            fields = _sampled_fields(path, cfg, sample)
        except OSError as e:
            raise InputError(f"input '{path}' cannot be read: {e.strerror or e}") from None
        if fields:
            samples.append(fields)
    if not samples:
        return
    seen = set().union(*(keys for fields in samples for keys in fields))
    for what, name in (("text", cfg.text_field), ("id", cfg.id_field), ("group", cfg.group_field)):
        if name and not any(name in keys for fields in samples for keys in fields):
            raise InputError(f"{what} field '{name}' is missing from every record sampled in {len(samples)} input "
                             f"files; set shard.reader.{what}_field (fields seen: {_listed(seen)})")


def _brief(error: BaseException) -> str:
    """An exception as one short line: samples and log lines are read one per line."""
    return " ".join(str(error).split())[:160]


def _warn(path: Path, message: str) -> None:
    # A whole-file problem has no record to count a drop against, so it goes to the task log too.
    print(f"[read] {path}: {message}", file=sys.stderr, flush=True)
