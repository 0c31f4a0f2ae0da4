"""Shard format 3: small record batches, so a random row decodes few others, with their table in a file beside the
shard and only its block hashes in the manifest; format 2 folders (inline tables) still read as they did."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from sharding.batch_table import BLOCK
from sharding.shards import Manifest, ShardWriter
from training.data import DataError, MixedStream, OpenedSource

SEQ_LEN = 2048  # uint16: rows of 4 KiB, the users' shortest usual rows


def folder_of(folder: Path, shards: int, rows: int) -> np.ndarray:
    """`shards` train shards of `rows` rows each; row r holds r in its first token."""
    folder.mkdir()
    tokens = np.zeros((shards * rows, SEQ_LEN), np.uint16)
    tokens[:, 0] = np.arange(shards * rows)
    tokens[:, 1:] = np.random.default_rng(0).integers(0, 50_000, (shards * rows, SEQ_LEN - 1))
    infos = []
    for s in range(shards):
        writer = ShardWriter(folder / f"train-{s:05d}.arrow", SEQ_LEN, np.dtype(np.uint16), "train")
        writer.write(tokens[s * rows:(s + 1) * rows])
        infos.append(writer.close())
    Manifest(seq_len=SEQ_LEN, dtype="uint16", tokenizer_sha256="t", tokenizer_path="p", eos_id=0,
             config_sha256="c", shards=tuple(infos)).save(folder)
    return tokens


def test_a_random_row_decodes_at_most_four_rows_even_when_its_shard_must_be_opened(tmp_path: Path) -> None:
    tokens = folder_of(tmp_path / "s", shards=20, rows=40)
    source = OpenedSource(tmp_path / "s", max_open=2)  # 2 of 20 shards open: nearly every read opens one
    stream = MixedStream([source])
    ids = [stream.sample_id(k)[1] for k in range(200)]
    for i in ids:
        assert np.array_equal(source.get(i), tokens[i])
    assert source.readers_opened > 150
    assert source.rows_decoded <= 4 * len(ids)  # 256 rows a read with batches of 1 MiB, 2 more decodes an open


def test_the_manifest_keeps_eight_bytes_per_block_of_the_table(tmp_path: Path) -> None:
    folder_of(tmp_path / "s", shards=1, rows=4 * (2 * BLOCK + 5))  # 2 whole blocks of batches and 5 more
    (shard,) = Manifest.load(tmp_path / "s").shards
    assert shard.table_bytes == 20 * (2 * BLOCK + 5) == (tmp_path / "s" / "train-00000.batches").stat().st_size
    assert len(base64.b64decode(shard.table)) == 3 * 8 and not shard.batches


def test_a_damaged_table_is_found_by_its_block_and_the_rest_still_reads(tmp_path: Path) -> None:
    tokens = folder_of(tmp_path / "s", shards=1, rows=4 * 3 * BLOCK)  # 3 blocks of the table
    table, manifest = tmp_path / "s" / "train-00000.batches", Manifest.load(tmp_path / "s")
    original = table.read_bytes()
    damaged = bytearray(original)
    damaged[20 * (BLOCK + 7) + 3] ^= 0x04  # an offset in block 1
    table.write_bytes(bytes(damaged))
    assert manifest.verify(tmp_path / "s", full=False) == []  # same size: only the block's hash can tell
    assert manifest.verify(tmp_path / "s") == ["train-00000.batches: block 1 of its batch table differs from the "
                                               "manifest's XXH3 (damaged, truncated or of another shard)"]
    source = OpenedSource(tmp_path / "s")
    assert np.array_equal(source.get(5), tokens[5]) and np.array_equal(source.get(4 * 2 * BLOCK), tokens[4 * 2 * BLOCK])
    with pytest.raises(DataError, match=rf"{table}: block 1 of its batch table differs .* run `stillroom inspect "
                                        rf"--verify {tmp_path / 's'}`"):
        source.get(4 * BLOCK + 1)
    table.write_bytes(original[:-20])
    with pytest.raises(DataError, match=rf"train-00000.batches: {len(original) - 20} bytes, manifest says "
                                        rf"{len(original)}"):
        OpenedSource(tmp_path / "s")
    table.unlink()
    assert manifest.verify(tmp_path / "s", full=False) == ["train-00000.batches: missing"]


def test_a_manifest_row_count_that_the_batches_cannot_hold_is_refused(tmp_path: Path) -> None:
    folder_of(tmp_path / "s", shards=1, rows=40)
    path = tmp_path / "s" / "manifest.json"
    data = json.loads(path.read_text())
    data["shards"][0]["rows"] = 45  # 12 batches of 4, not the 10 the table lists
    path.write_text(json.dumps(data))
    source = OpenedSource(tmp_path / "s")
    with pytest.raises(DataError, match="has 10 record batches of 4 rows, which cannot hold the 45 rows of the "
                                        "manifest"):
        source.get(0)


def test_a_format_2_folder_reads_and_keeps_its_identity(tmp_path: Path) -> None:
    tokens = folder_of(tmp_path / "s", shards=2, rows=40)
    data = json.loads((tmp_path / "s" / "manifest.json").read_text())
    data["format_version"] = 2
    for shard in data["shards"]:  # its table inline, as format 2 wrote it
        table = tmp_path / "s" / shard["path"].replace(".arrow", ".batches")
        shard["batches"] = base64.b64encode(table.read_bytes()).decode()
        del shard["table"], shard["table_bytes"], shard["batch_rows"], shard["dtype"]
        table.unlink()
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(data))
    manifest = Manifest.load(tmp_path / "s")
    assert manifest.sha256() == hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    assert manifest.verify(tmp_path / "s") == [] and "table" not in json.dumps(asdict(manifest)["shards"][0]["table"])
    source = OpenedSource(tmp_path / "s")
    assert np.array_equal(np.stack([source.get(i) for i in range(80)]), tokens)


def test_splits_of_other_dtypes_than_the_manifest_decode_as_written(tmp_path: Path) -> None:
    """A teacher cache's folder: float16 values and uint16 indices under one manifest (its dtype: float16)."""
    (tmp_path / "c").mkdir()
    values = np.random.default_rng(2).standard_normal((10, 64)).astype(np.float16)
    indices = np.random.default_rng(3).integers(0, 65_536, (10, 64)).astype(np.uint16)
    infos = []
    for split, rows in (("values", values), ("indices", indices)):
        writer = ShardWriter(tmp_path / "c" / f"{split}-00000.arrow", 64, rows.dtype, split)
        writer.write(rows)
        infos.append(writer.close())
    Manifest(seq_len=64, dtype="float16", tokenizer_sha256="t", tokenizer_path="p", eos_id=0, config_sha256="c",
             shards=tuple(infos)).save(tmp_path / "c")
    for split, rows in (("values", values), ("indices", indices)):
        source = OpenedSource(tmp_path / "c", split)
        read = np.stack([source.get(i) for i in range(10)])
        assert read.dtype == rows.dtype and np.array_equal(read, rows)
