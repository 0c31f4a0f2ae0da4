from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sharding.shards import Manifest, ShardInfo, ShardReader, ShardWriter, sha256_file, token_dtype
from sharding.tokenize import Packer, TokenizerError, load_tokenizer, train_bpe_tokenizer

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
    reader = ShardReader(tmp_path / "train-00000.arrow")
    assert len(reader) == 10000 and reader.batch(0).nbytes >= 1 << 20  # batches of at least ~1 MB
    assert np.array_equal(np.stack(list(reader)), rows)
    for i in (0, 8191, 8192, 9999):
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


def test_tokenizer_loading_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(str(tmp_path / "nope"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="unreadable"):
        load_tokenizer(str(tmp_path / "bad"))
    path = train_bpe_tokenizer(TEXT, 300, tmp_path / "tok")
    tokenizer, info = load_tokenizer(str(path.parent))
    assert info.eos_id == tokenizer.token_to_id("<|endoftext|>") and len(info.sha256) == 64
    with pytest.raises(TokenizerError, match="no end-of-document token"):
        load_tokenizer(str(path), eos_token="</s>")
