from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from sharding.config import ShardConfig
from sharding.packing import pack_group
from sharding.shard_reader import ShardReader
from sharding.shards import BATCH_BYTES, Manifest, ManifestError, ShardInfo, ShardWriter, sha256_file, token_dtype
from sharding.stage import TOKENS_SCHEMA
from sharding.tokenize import Packer, TokenizerError, load_tokenizer, train_bpe_tokenizer
from training.data import DataError, OpenedSource

TEXT = ["The licensee may copy and distribute the Program.", "Permission is hereby granted, free of charge.",
        "THE SOFTWARE IS PROVIDED AS IS, WITHOUT WARRANTY OF ANY KIND."] * 20


def test_writer_reader_round_trip_with_random_access(tmp_path: Path) -> None:
    rows = np.random.default_rng(0).integers(0, 60000, (10000, 64))
    writer = ShardWriter(tmp_path / "train-00000.arrow", 64, np.dtype(np.uint16), "train")
    for start in range(0, len(rows), 777):
        writer.write(rows[start:start + 777])
    info = writer.close()
    assert (info.rows, info.tokens, info.split) == (10000, 10000 * 64, "train")
    assert info.sha256 == sha256_file(tmp_path / "train-00000.arrow") and not list(tmp_path.glob(".*tmp"))
    for reader in (ShardReader(tmp_path / "train-00000.arrow"),  # through the footer, and through the table file
                   ShardReader(tmp_path / "train-00000.arrow", info.batch_table(tmp_path), info.rows)):
        assert len(reader) == 10000 and reader.batch(0).nbytes == BATCH_BYTES == 16 << 10  # 128 rows of 128 bytes
        assert np.array_equal(np.stack(list(reader)), rows)
        for i in (0, 127, 128, 9999):
            assert np.array_equal(reader.row(i), rows[i])
        with pytest.raises(IndexError):
            reader.row(10000)


def test_manifest_verify_catches_a_flipped_byte(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path / "val-00000.arrow", 8, np.dtype(np.uint32), "val")
    writer.write(np.arange(800).reshape(100, 8))
    manifest = Manifest(seq_len=8, dtype="uint32", tokenizer_sha256="t", tokenizer_path="p", eos_id=0,
                        config_sha256="c", shards=(writer.close(),))
    manifest.save(tmp_path)
    again = Manifest.load(tmp_path)
    assert again == manifest and again.verify(tmp_path) == []
    data = bytearray((tmp_path / "val-00000.arrow").read_bytes())
    data[len(data) // 2] ^= 0x01
    (tmp_path / "val-00000.arrow").write_bytes(bytes(data))
    assert again.verify(tmp_path, full=False) == []  # same size: only the hash can tell
    (problem,) = again.verify(tmp_path)
    assert problem.startswith("val-00000.arrow: sha256 differs")
    assert isinstance(again.shards[0], ShardInfo)


def test_packer_cuts_exact_rows_with_eos_between_documents() -> None:
    packer = Packer(seq_len=4, eos_id=9, dtype=np.dtype(np.uint16))
    assert packer.add(np.array([1, 2])).shape == (0, 4)
    rows = packer.add(np.array([3, 4, 5, 6, 7]))
    assert rows.tolist() == [[1, 2, 9, 3], [4, 5, 6, 7]] and packer.tail_tokens == 1
    assert packer.add(np.array([8, 8])).tolist() == [[9, 8, 8, 9]] and packer.tail_tokens == 0


def test_token_dtype() -> None:
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    with pytest.raises(ValueError, match="do not fit uint32"):
        token_dtype((1 << 32) + 1)


def test_tokenizer_loading_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(str(tmp_path / "nope"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="unreadable"):
        load_tokenizer(str(tmp_path / "bad"))
    (tmp_path / "bad-sp").mkdir()  # no tokenizer.json, a SentencePiece model that is not one
    (tmp_path / "bad-sp" / "tokenizer.model").write_bytes(b"\x00not a protobuf" * 10)
    with pytest.raises(TokenizerError, match="tokenizer.model is not a readable SentencePiece model"):
        load_tokenizer(str(tmp_path / "bad-sp"))
    path = train_bpe_tokenizer(TEXT, 300, tmp_path / "tok")
    tokenizer, info = load_tokenizer(str(path.parent))
    assert info.eos_id == tokenizer.token_to_id("<|endoftext|>") and len(info.sha256) == 64
    with pytest.raises(TokenizerError, match="no end-of-document token"):
        load_tokenizer(str(path), eos_token="</s>")


def batch_ranges(path: Path) -> list[tuple[int, int]]:
    """(offset, length) of each record batch's IPC message, found by parsing the file (not from the manifest)."""
    data = pa.memory_map(str(path)).read_buffer()
    stream = pa.BufferReader(data)
    stream.seek(8)  # "ARROW1" and 2 bytes of padding
    pa.ipc.read_message(stream)  # the schema
    ranges = []
    for _ in range(pa.ipc.open_file(data).num_record_batches):
        start = stream.tell()
        assert pa.ipc.read_message(stream).type == "record batch"
        ranges.append((start, stream.tell() - start))
    return ranges


def wide_shard(folder: Path, rows: int = 4096, seq_len: int = 256) -> np.ndarray:
    """A shard folder of one uint32 train shard of 4 record batches of 1 MiB, ids drawn from [0, 200000)."""
    folder.mkdir()
    tokens = np.random.default_rng(1).integers(0, 200_000, (rows, seq_len))
    writer = ShardWriter(folder / "train-00000.arrow", seq_len, np.dtype(np.uint32), "train", batch_bytes=1 << 20)
    writer.write(tokens)
    Manifest(seq_len=seq_len, dtype="uint32", tokenizer_sha256="t", tokenizer_path="p", eos_id=0,
             config_sha256="c", shards=(writer.close(),)).save(folder)
    return tokens


def test_batch_table_names_exactly_each_batch_message(tmp_path: Path) -> None:
    tokens = wide_shard(tmp_path / "s")
    path = tmp_path / "s" / "train-00000.arrow"
    (info,) = Manifest.load(tmp_path / "s").shards
    table = info.batch_table(tmp_path / "s")
    assert table is not None and len(info.table) == 12 and info.table_bytes == 80  # 1 block hash; 20 bytes a batch
    assert (tmp_path / "s" / "train-00000.batches").stat().st_size == 80
    assert [(int(e["offset"]), int(e["length"])) for e in table.entries()] == batch_ranges(path) and len(table) == 4
    data = pa.memory_map(str(path)).read_buffer()
    footer = pa.ipc.open_file(data)
    for i, entry in enumerate(table.entries()):
        message = pa.ipc.read_message(data.slice(int(entry["offset"]), int(entry["length"])))
        assert pa.ipc.read_record_batch(message, footer.schema).equals(footer.get_batch(i))
    assert np.array_equal(np.stack(list(ShardReader(path, table, info.rows))), tokens)


def test_forty_bit_flips_in_batch_bytes_are_each_refused_naming_the_shard(tmp_path: Path) -> None:
    tokens = wide_shard(tmp_path / "s")
    path = tmp_path / "s" / "train-00000.arrow"
    ranges, rng = batch_ranges(path), np.random.default_rng(16)
    for _ in range(40):
        b = int(rng.integers(len(ranges)))
        position, bit = ranges[b][0] + int(rng.integers(ranges[b][1])), int(rng.integers(8))
        with path.open("r+b") as f:
            f.seek(position)
            byte = f.read(1)[0]
            f.seek(position)
            f.write(bytes([byte ^ (1 << bit)]))
        source = OpenedSource(tmp_path / "s")  # sizes match: only the batch's checksum can tell
        with pytest.raises(DataError) as info:
            source.get(b * 1024 + 5)
        assert str(info.value).startswith(f"{path} record batch {b} of 4 is damaged"), (position, bit)
        assert f"run `stillroom inspect --verify {tmp_path / 's'}`" in str(info.value)
        assert "\n" not in str(info.value)
        source.close()
        with path.open("r+b") as f:
            f.seek(position)
            f.write(bytes([byte]))
    source = OpenedSource(tmp_path / "s")
    assert np.array_equal(np.stack([source.get(i) for i in range(0, 4096, 97)]), tokens[::97])


def test_format_1_manifests_load_with_one_warning_and_keep_their_identity(tmp_path: Path) -> None:
    rows = np.arange(800).reshape(100, 8)
    writer = ShardWriter(tmp_path / "train-00000.arrow", 8, np.dtype(np.uint16), "train")
    writer.write(rows)
    shard = {k: v for k, v in asdict(writer.close()).items() if k not in ("batches", "table", "table_bytes")}
    old = {"seq_len": 8, "dtype": "uint16", "tokenizer_sha256": "t", "tokenizer_path": "p", "eos_id": 0,
           "config_sha256": "c", "shards": [shard], "extra": {}, "format_version": 1}
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    with pytest.warns(UserWarning, match="shard format 1 has no per-batch checksums; only shard sizes can be "
                                         "checked for this folder") as caught:
        manifest = Manifest.load(tmp_path)
    assert len(caught) == 1 and manifest.format_version == 1
    assert manifest.sha256() == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()
    with pytest.warns(UserWarning):
        source = OpenedSource(tmp_path)
    assert np.array_equal(np.stack([source.get(i) for i in range(100)]), rows)


@pytest.mark.parametrize("name", ["../x.arrow", "/tmp/x.arrow", "sub/../../x.arrow", "link.arrow"])
def test_manifest_paths_must_stay_inside_their_folder(tmp_path: Path, name: str) -> None:
    folder, outside = tmp_path / "shards", tmp_path / "x.arrow"
    folder.mkdir()
    writer = ShardWriter(outside, 8, np.dtype(np.uint16), "train")
    writer.write(np.zeros((4, 8), np.int64))
    info = replace(writer.close(), path=name)
    (folder / "link.arrow").symlink_to(outside)
    Manifest(seq_len=8, dtype="uint16", tokenizer_sha256="t", tokenizer_path="p", eos_id=0, config_sha256="c",
             shards=(info,)).save(folder)
    with pytest.raises(ManifestError, match=rf"manifest.json: file path '{re.escape(name)}' is not inside the folder"):
        Manifest.load(folder)


def test_sparse_ids_above_65535_get_uint32_shards_and_round_trip(tmp_path: Path) -> None:
    vocab = {"[UNK]": 0, "<|endoftext|>": 1, "a": 2, "rare": 70000}  # 4 entries, highest id 70000
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    tokenizer, info = load_tokenizer(str(tmp_path))
    docs = ["a rare a", "rare rare a rare", "a a a rare a"] * 10
    ids = [np.array(e.ids, np.uint32) for e in tokenizer.encode_batch(docs)]
    assert info.vocab_size == 4 and ids[0].tolist() == [2, 70000, 2]
    work = tmp_path / "000000.tokens.arrow"  # a tokens work file as the map writes it
    offsets = np.cumsum([0] + [len(i) for i in ids])
    with pa.ipc.new_file(str(work), TOKENS_SCHEMA) as w:
        w.write_batch(pa.record_batch({"record": pa.array(range(len(ids)), pa.int64()),
                                       "val": pa.array([False] * len(ids)),
                                       "tokens": pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()),
                                                                               pa.array(np.concatenate(ids)))},
                                      schema=TOKENS_SCHEMA))
    n = len(ids)
    out = tmp_path / "out"
    out.mkdir()
    dtype = token_dtype(info.id_bound)  # what the finish step writes into the manifest
    assert dtype == np.uint32
    packed = pack_group(ShardConfig(seq_len=4), out, 0, [(work, np.ones(n, bool))], info.eos_id, dtype)
    train = [ShardInfo(**s) for s in packed["shards"] if s["split"] == "train"]
    assert train and train[0].path == "train-00000-00000.arrow" and packed["tokens"]["train"]["docs"] == n
    stored = np.concatenate([ShardReader(out / s.path).batch(0).reshape(-1) for s in train])
    expected = np.concatenate([np.append(i, info.eos_id) for i in ids])
    assert stored.dtype == np.uint32 and np.array_equal(stored, expected[: len(stored)]) and stored.max() == 70000


def test_ids_that_do_not_fit_the_shard_dtype_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="token id 70000 does not fit uint16"):
        Packer(seq_len=4, eos_id=1, dtype=np.dtype(np.uint16)).add(np.array([2, 70000], np.uint32))
    writer = ShardWriter(tmp_path / "train-00000.arrow", 4, np.dtype(np.uint16), "train")
    with pytest.raises(ValueError, match=r"train-00000.arrow: token id 65536 does not fit uint16 \(0..65535\)"):
        writer.write(np.array([[1, 2, 3, 65536]]))
    with pytest.raises(ValueError, match="token id -1 does not fit uint16"):
        writer.write(np.array([[1, 2, 3, -1]]))
    writer.write(np.array([[1, 2, 3, 65535]]))
    info = writer.close()
    reader = ShardReader(tmp_path / "train-00000.arrow", info.batch_table(tmp_path), 1)
    assert reader.row(0).tolist() == [1, 2, 3, 65535]


def test_verify_names_the_damaged_batches_of_a_shard(tmp_path: Path) -> None:
    wide_shard(tmp_path / "s")
    path = tmp_path / "s" / "train-00000.arrow"
    manifest, ranges, original = Manifest.load(tmp_path / "s"), batch_ranges(path), path.read_bytes()
    intact = "its 4 record batches are intact: the damage is in its schema or footer"
    for position, named in ((ranges[2][0] + 1000, "damaged record batches: 2 of 4"), (len(original) - 20, intact)):
        data = bytearray(original)
        data[position] ^= 0x10
        path.write_bytes(bytes(data))
        assert manifest.verify(tmp_path / "s", full=False) == []  # same size
        assert manifest.verify(tmp_path / "s") == [f"train-00000.arrow: sha256 differs from the manifest (corrupt or "
                                                   f"changed); {named}"]
