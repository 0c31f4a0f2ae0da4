"""Splitting large inputs into map units (`sharding.units`): every record is read by exactly one piece, whatever
the piece size and wherever a boundary falls (inside a line, on a newline, inside an over-long line); a piece
reads about its own bytes, not the file; and the shard stage keeps the same documents, drops the same records and
writes the same shards with splitting as without."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from launcher.run_config import load_run_config
from sharding.config import ReaderConfig
from sharding.documents import Tally
from sharding.readers import read_file
from sharding.reduce import run_all
from sharding.shards import Manifest
from sharding.stage import INPUTS, stat_inputs
from sharding.tokenize import train_bpe_tokenizer
from sharding.units import plan_units
from tests.unit.test_bucketed_dedup import VOCAB, corpus

READER = ReaderConfig(max_doc_bytes=300)


def awkward_jsonl(path: Path) -> bytes:
    """A JSONL file with everything a piece boundary can land in or next to."""
    lines = ['\ufeff{"text": "first, after a byte order mark"}', "", "   ", '{"text": "after blank lines"}',
             '{"text": "' + "x" * 900 + '"}',  # over max_doc_bytes: skipped in chunks, dropped as read.too_long
             "{not json", '["an array"]', '{"text": ""}', '{"text": "\\ud800 a lone surrogate"}']
    rng = random.Random(3)
    lines += [json.dumps({"text": " ".join(rng.choice(VOCAB) for _ in range(rng.randint(1, 30)))}) for _ in range(40)]
    data = ("\n".join(lines) + "\n" + '{"text": "the last line, cut off').encode()
    path.write_bytes(data)
    return data


def read_units(path: Path, split_mb: float, reader: ReaderConfig = READER) -> tuple[list[Any], Tally, int]:
    """(the documents of every unit in order, the merged tally, the unit count)."""
    units = plan_units(stat_inputs([path]), split_mb)
    docs, total = [], Tally()
    for unit in units:
        tally = Tally()
        docs += list(read_file(path, 0, reader, tally, unit.piece))
        total.merge(tally)
    return docs, total, len(units)


def counts(tally: Tally) -> tuple[int, Counter[str], Counter[str]]:
    return tally.docs_in, +tally.dropped, +tally.files


def test_every_jsonl_record_is_read_by_exactly_one_piece_wherever_the_boundaries_fall(tmp_path: Path) -> None:
    path = tmp_path / "awkward.jsonl"
    data = awkward_jsonl(path)
    whole, whole_tally, one = read_units(path, 0)
    assert one == 1 and whole_tally.docs_in > len(whole) > 40
    starts = {0} | {i + 1 for i, b in enumerate(data) if b == ord("\n")}
    for size in (1, 2, 3, 5, 8, 13, 64, 100, 301, 899, 1000, len(data) - 1):
        docs, tally, pieces = read_units(path, size / 1e6)
        assert pieces == -(-len(data) // size)
        assert [d.text for d in docs] == [d.text for d in whole], size
        assert counts(tally) == counts(whole_tally), size
        # A split file's records are the byte offsets of their lines, and that is where the line is.
        for doc, same in zip(docs, whole, strict=True):
            assert doc.record in starts
            assert data[doc.record:].split(b"\n", 1)[0].lstrip(b"\xef\xbb\xbf") == \
                data.split(b"\n")[same.record].lstrip(b"\xef\xbb\xbf")
        assert all("@" in s for samples in tally.samples.values() for s in samples), size


def test_a_piece_reads_about_its_own_bytes_not_the_file(tmp_path: Path) -> None:
    path = tmp_path / "large.jsonl"
    rng = random.Random(5)
    with open(path, "w") as f:
        for _ in range(8_000):
            f.write(json.dumps({"text": " ".join(rng.choice(VOCAB) for _ in range(rng.randint(100, 200)))}) + "\n")
    size = path.stat().st_size
    units = plan_units(stat_inputs([path]), 1.0)  # pieces of 1 MB
    assert len(units) == -(-size // 1_000_000) >= 6

    def rchar() -> int:  # bytes this process has read through read() and pread() calls
        return int(next(line for line in Path("/proc/self/io").read_text().splitlines()
                        if line.startswith("rchar:")).split()[1])

    total = 0
    for unit in units:
        before = rchar()
        docs = sum(1 for _ in read_file(path, 0, ReaderConfig(), Tally(), unit.piece))
        read = rchar() - before
        assert docs > 0 and read < unit.size + 128 * 1024, (unit, read)
        total += read
    assert total < 1.1 * size


def test_a_parquet_file_is_split_by_row_groups_and_keeps_its_row_numbers(tmp_path: Path) -> None:
    path = tmp_path / "rows.parquet"
    texts = corpus(7, 97)
    pq.write_table(pa.table({"text": texts}), path, row_group_size=7)  # 14 row groups
    size = path.stat().st_size
    whole, whole_tally, _ = read_units(path, 0, ReaderConfig())
    for pieces in (2, 3, 5, 14, 20):
        docs, tally, count = read_units(path, (size // pieces + 1) / 1e6, ReaderConfig())
        assert count == pieces
        assert [(d.text, d.record) for d in docs] == [(d.text, d.record) for d in whole] == \
            [(t, i) for i, t in enumerate(texts)]
        assert counts(tally) == counts(whole_tally)


def test_zstd_and_text_files_and_small_files_stay_whole(tmp_path: Path) -> None:
    names = ("a.jsonl.zst", "b.txt", "c.jsonl")
    for name in names:
        (tmp_path / name).write_bytes(b"x" * 5000)
    (tmp_path / "d.jsonl").write_bytes(b"x" * 500)
    units = plan_units(stat_inputs([tmp_path / n for n in (*names, "d.jsonl")]), 0.001)
    assert [(u.file, u.piece.count) for u in units] == [(0, 1), (1, 1)] + [(2, 5)] * 5 + [(3, 1)]
    assert [u.piece.start for u in units if u.file == 2] == [0, 1000, 2000, 3000, 4000]
    assert [u.size for u in units] == [5000, 5000] + [1000] * 5 + [500]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_bpe_tokenizer(VOCAB * 3, 400, tmp_path_factory.mktemp("tokenizer"))


def test_the_stage_keeps_the_same_documents_and_writes_the_same_shards_with_splitting(tmp_path: Path,
                                                                                       tokenizer: Path) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    texts = corpus(11, 900)  # exact and near copies, far apart in the file: duplicates across pieces
    lines = [json.dumps({"text": t}) for t in texts]
    lines[100:100] = ["{broken", '{"text": "' + "y" * 900 + '"}']
    (inputs / "big.jsonl").write_text("\n".join(lines) + "\n")
    pq.write_table(pa.table({"text": corpus(12, 300)}), inputs / "rows.parquet", row_group_size=20)
    (inputs / "small.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus(13, 20)))

    def stage(split_mb: float, tasks: int) -> tuple[Path, dict[str, Any]]:
        out = tmp_path / f"out-{split_mb}-{tasks}"
        cfg = load_run_config(None, [
            f"shard.inputs={json.dumps([str(inputs)])}", f"shard.tokenizer={tokenizer}", "shard.seq_len=16",
            "shard.val_fraction=0.2", "shard.shard_sequences=8", "shard.pack_shards=100000", "shard.clean.steps=[]",
            "shard.encode_batch=8", "shard.threads=1", "shard.workers=1", f"shard.tasks={tasks}",
            "shard.dedup.buckets=3", "shard.reader.max_doc_bytes=500", f"shard.split_mb={split_mb}"]).shard
        stats = run_all(cfg, out, "hash")
        recorded = json.loads((out / INPUTS).read_text())["files"]
        assert len(plan_units(recorded, split_mb)) == (10 if split_mb else 3)
        return out, stats

    whole, whole_stats = stage(0, 1)
    split, split_stats = stage(0.02, 4)  # 20 kB pieces: the JSONL in 7, the Parquet in 2
    # One packing group either way, so the shards are the same bytes: the same documents, in the same order.
    assert Manifest.load(split).shards == Manifest.load(whole).shards
    for key in ("docs_in", "docs_kept", "dropped", "files", "modified", "tokens"):
        assert split_stats[key] == whole_stats[key], key
    assert whole_stats["dropped"]["dedup.exact"] > 10 and whole_stats["dropped"]["dedup.near"] > 10
    # Drops in a split JSONL are located by the byte where their line starts.
    data = (inputs / "big.jsonl").read_bytes()
    located = [s.split(": ")[0] for s in split_stats["samples"]["dedup.exact"]]
    assert located and all("big.jsonl@" in s for s in located)
    for where in located:
        offset = int(where.rsplit("@", 1)[1])
        assert offset == 0 or data[offset - 1] == ord("\n")
