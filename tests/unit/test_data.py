from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from sharding.shard_reader import ShardReader
from sharding.shards import Manifest, ShardWriter
from sharding.tokenize import tokenizer_fingerprint
from tests.unit.test_shards import batch_ranges
from training.config import DataConfig
from training.data import DataError, EvalSet, MixedStream, OpenedSource, check_compatible, open_sources

TOKENIZER = "a" * 64


def make_source(folder: Path, s: int, train: int, val: int = 0, seq_len: int = 8, shard_rows: int = 64,
                tokenizer: str = TOKENIZER, eos_id: int = 0) -> Path:
    """A shard folder whose row r of source s holds s*1000 + r in every position (both splits)."""
    folder.mkdir(parents=True)
    infos = []
    for split, n in (("train", train), ("val", val)):
        for i, start in enumerate(range(0, n, shard_rows)):
            values = np.arange(start, min(n, start + shard_rows)) + s * 1000
            writer = ShardWriter(folder / f"{split}-{i:05d}.arrow", seq_len, np.dtype(np.uint16), split)
            writer.write(np.repeat(values[:, None], seq_len, axis=1))
            infos.append(writer.close())
    Manifest(seq_len=seq_len, dtype="uint16", tokenizer_sha256=tokenizer, tokenizer_path="tok", eos_id=eos_id,
             config_sha256="c", shards=tuple(infos)).save(folder)
    return folder


def decode(x: np.ndarray) -> list[tuple[int, int]]:
    """The (source, row) ids a batch holds, read from its token values."""
    assert x.dtype == np.int64 and (x == x[:, :1]).all()
    return [(int(v) // 1000, int(v) % 1000) for v in x[:, 0]]


@pytest.fixture
def folders(tmp_path: Path) -> list[Path]:
    # 200 domain rows over shards of 64, 37 replay rows: neither a power of two, so cycle walking matters
    return [make_source(tmp_path / "domain", 0, 200, val=50), make_source(tmp_path / "replay", 1, 37, val=10)]


def stream(folders: list[Path], weights: tuple[float, ...] = (0.95, 0.05), seed: int = 1234) -> MixedStream:
    return MixedStream([OpenedSource(f) for f in folders], weights, seed)


def test_config_checks_name_the_field() -> None:
    assert DataConfig() == DataConfig(sources=(), weights=(), seed=1234, split="train")
    with pytest.raises(ValueError, match="^weights must be empty or have one entry per source"):
        DataConfig(sources=("a", "b"), weights=(1.0,))
    with pytest.raises(ValueError, match="^weights must be positive"):
        DataConfig(sources=("a",), weights=(0.0,))
    with pytest.raises(ValueError, match="^names must"):
        DataConfig(sources=("a",), names=("x", "y"))
    with pytest.raises(ValueError, match="^seed must"):
        DataConfig(seed=-1)
    with pytest.raises(DataError, match="no data sources configured"):
        open_sources(DataConfig())


def test_opened_source_reads_every_row_in_order_decompressing_each_batch_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # seq_len 2048 uint16: 4 rows per record batch, so shards of 10 rows hold 3 batches
    source = OpenedSource(make_source(tmp_path / "big", 0, 18, seq_len=2048, shard_rows=10))
    calls: list[int] = []
    original = ShardReader.batch

    def counting(self: ShardReader, b: int) -> np.ndarray:
        calls.append(b)
        return original(self, b)

    monkeypatch.setattr(ShardReader, "batch", counting)
    assert (source.rows, source.seq_len, source.name) == (18, 2048, "big")
    assert [int(source.get(i)[0]) for i in range(18)] == list(range(18))
    assert calls == [0, 1, 2, 0, 1] and source.rows_decoded == 18  # 3 batches in the first shard, 2 in the second
    assert not source.get(5).flags.writeable
    with pytest.raises(IndexError):
        source.get(18)


def test_stream_is_deterministic_and_batches_hold_the_ids_they_report(folders: list[Path]) -> None:
    a, b = stream(folders), stream(folders)
    assert [a.sample_id(k) for k in range(3000)] == [b.sample_id(k) for k in range(3000)]
    assert [a.sample_id(k) for k in range(300)] != [stream(folders, seed=7).sample_id(k) for k in range(300)]
    for step in range(5):
        x, ids = a.batch(step, 0, 0, 1, 6, 1)
        assert x.shape == (6, 8) and decode(x) == ids == [a.sample_id(k) for k in range(step * 6, step * 6 + 6)]


def test_counts_stay_within_one_of_the_weights_at_every_prefix(folders: list[Path]) -> None:
    s = stream(folders, (0.95, 0.05))
    counts = [0, 0]
    for k in range(4000):
        assert s.schedule.drawn(k) == counts
        assert abs(counts[1] - 0.05 * k) <= 0.5  # Tijdeman's bound for two sources
        counts[s.sample_id(k)[0]] += 1
    rng = np.random.default_rng(0)
    for n in (3, 5, 7):  # the same folder opened n times: the schedule only needs sizes
        weights = tuple(rng.uniform(0.01, 1.0, n))
        mixed = MixedStream([OpenedSource(folders[0]) for _ in range(n)], weights)
        p = np.array(mixed.schedule.tickets) / mixed.schedule.period
        assert np.allclose(p, np.array(weights) / sum(weights), atol=1e-4)
        running = np.zeros(n, dtype=np.int64)
        for k in range(mixed.schedule.period + 5):
            assert mixed.schedule.drawn(k) == running.tolist()
            assert np.abs(running - k * p).max() <= 1 - 1 / (2 * n - 2) + 1e-9
            running[mixed.sample_id(k)[0]] += 1


def test_every_row_once_per_epoch_and_epochs_reshuffle(folders: list[Path]) -> None:
    s = stream(folders, (0.5, 0.5))
    draws: dict[int, list[int]] = {0: [], 1: []}
    for k in range(2 * 3 * 200):
        source, row = s.sample_id(k)
        draws[source].append(row)
    for source, rows in ((0, 200), (1, 37)):
        epochs = [draws[source][e * rows:(e + 1) * rows] for e in range(3)]
        assert all(sorted(epoch) == list(range(rows)) for epoch in epochs)
        assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(rows))
    # a shuffle, not a stride: positions and rows are uncorrelated, and no constant step between neighbours
    order = np.array(draws[0][:200])
    assert abs(np.corrcoef(np.arange(200), order)[0, 1]) < 0.2 and len(set(np.diff(order) % 200)) > 50


def test_resume_from_state_dict_continues_identically(folders: list[Path]) -> None:
    world, micro_batch, accum = 2, 3, 2

    def run(s: MixedStream, steps: int) -> list[list[tuple[int, int]]]:
        ids = []
        for _ in range(steps):
            ids += [s.next_batch(m, r, world, micro_batch, accum)[1] for m in range(accum) for r in range(world)]
            s.advance(world * micro_batch * accum)
        return ids

    first = stream(folders)
    assert run(first, 5) == [first.batch(t, m, r, world, micro_batch, accum)[1]
                             for t in range(5) for m in range(accum) for r in range(world)]
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints may store it as JSON
    assert state["samples_consumed"] == 5 * 12 and state["per_source"] == [57, 3]
    rest = run(first, 3)
    resumed = stream(folders)
    resumed.load_state_dict(state)
    assert run(resumed, 3) == rest and resumed.state_dict() == first.state_dict()
    resumed.load_state_dict({})  # a fresh run's empty state is the start of the stream
    assert resumed.consumed == 0 and resumed.next_batch(0, 0, 1, 2, 1)[1] == [first.sample_id(k) for k in (0, 1)]


def test_resume_with_another_global_batch_continues_from_samples_consumed(folders: list[Path]) -> None:
    first = stream(folders)
    for _ in range(10):
        first.advance(4)
    resumed = stream(folders)
    resumed.load_state_dict(first.state_dict())  # 40 samples consumed
    _, ids = resumed.next_batch(0, 1, 2, 5, 3)  # global batch 30 from here: rank 1's slot is samples 45..49
    assert ids == [first.sample_id(k) for k in range(45, 50)]
    resumed.advance(30)
    assert resumed.next_batch(2, 0, 2, 5, 3)[1] == [first.sample_id(k) for k in range(90, 95)]


@pytest.mark.parametrize(("layout_a", "layout_b"), [((2, 1), (1, 2)), ((4, 1), (2, 2)), ((1, 4), (4, 1))])
def test_elastic_layouts_consume_the_same_ids_in_the_same_order_per_step(
        folders: list[Path], layout_a: tuple[int, int], layout_b: tuple[int, int]) -> None:
    def per_step(world: int, accum: int, step: int) -> list[tuple[int, int]]:
        s = stream(folders)
        slots = {m * world + r: s.batch(step, m, r, world, 3, accum) for m in range(accum) for r in range(world)}
        for x, ids in slots.values():
            assert decode(x) == ids
        return [sample for i in sorted(slots) for sample in slots[i][1]]

    size = layout_a[0] * layout_a[1] * 3  # the global batch, equal for both layouts
    for step in (0, 1, 7):
        expected = [stream(folders).sample_id(k) for k in range(step * size, (step + 1) * size)]
        assert per_step(*layout_a, step) == per_step(*layout_b, step) == expected


def test_resume_far_into_the_stream_is_constant_time(folders: list[Path]) -> None:
    first = stream(folders)
    first.advance(5 * 10**7)
    state = first.state_dict()
    assert sum(state["per_source"]) == 5 * 10**7 and state["per_source"][1] == 5 * 10**7 // 20
    resumed = stream(folders)
    start = time.perf_counter()
    resumed.load_state_dict(state)
    x, ids = resumed.next_batch(0, 3, 4, 25, 1)
    elapsed = time.perf_counter() - start
    assert elapsed < 0.1, f"resume took {elapsed:.3f} s"
    assert decode(x) == ids == [first.sample_id(k) for k in range(5 * 10**7 + 75, 5 * 10**7 + 100)]


def test_load_state_refuses_another_stream(folders: list[Path], tmp_path: Path) -> None:
    state = stream(folders).state_dict()
    for other, match in ((stream(folders, (0.9, 0.1)), "weights"), (stream(folders, seed=1), "seed"),
                         (stream([folders[0], make_source(tmp_path / "x", 1, 38)]), "manifests differ")):
        with pytest.raises(DataError, match=match):
            other.load_state_dict(state)
    with pytest.raises(DataError, match="inconsistent"):
        stream(folders).load_state_dict({**state, "samples_consumed": 1})


def test_corrupt_and_truncated_shards_are_refused(folders: list[Path]) -> None:
    shard = folders[0] / "train-00001.arrow"
    data = bytearray(shard.read_bytes())
    ((offset, length),) = batch_ranges(shard)
    data[offset + length // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    source = OpenedSource(folders[0])  # the check at the start only compares sizes...
    assert int(source.get(0)[0]) == 0
    with pytest.raises(DataError, match=rf"^{shard} record batch 0 of 1 is damaged .*stillroom inspect --verify"):
        source.get(64)  # ...and every batch read is checked: train-00001's first row
    with pytest.raises(DataError) as info:
        OpenedSource(folders[0], verify_hashes=True)
    assert str(folders[0]) in str(info.value) and "train-00001.arrow: sha256 differs" in str(info.value)
    assert "damaged record batches: 0 of 1" in str(info.value)
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(DataError, match=r"1 bad shard\(s\): train-00001.arrow: \d+ bytes, manifest says"):
        OpenedSource(folders[0])
    with pytest.raises(DataError, match="no manifest.json"):
        OpenedSource(folders[0] / "nope")


def test_sources_ending_documents_with_other_tokens_are_refused(tmp_path: Path) -> None:
    # Document masking restarts positions after the EOS token: one batch can follow only one.
    first = OpenedSource(make_source(tmp_path / "a", 0, 10))
    other = OpenedSource(make_source(tmp_path / "b", 1, 10, eos_id=3), name="replay")
    check_compatible([first, OpenedSource(make_source(tmp_path / "c", 2, 10))], TOKENIZER, 8)
    with pytest.raises(DataError, match=r"^source replay \(.*\) ends documents with token 3, a with 0: shard them "
                                        r"with one shard.eos_token$"):
        check_compatible([first, other], TOKENIZER, 8)


def test_tokenizer_and_seq_len_mismatches_are_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text('{"model": "ours"}')
    ours = tokenizer_fingerprint(str(tmp_path / "tok"))
    good = OpenedSource(make_source(tmp_path / "good", 0, 10, tokenizer=ours))
    other = OpenedSource(make_source(tmp_path / "other", 1, 10), name="replay")
    check_compatible([good], ours, 8)
    with pytest.raises(DataError) as info:
        check_compatible([good, other], ours, 8)
    assert str(info.value) == (f"source replay ({other.folder}) was tokenized with tokenizer {TOKENIZER[:12]} "
                               f"but the model's tokenizer is {ours[:12]}")
    with pytest.raises(DataError, match="has sequences of 8 tokens but training uses seq_len 16"):
        check_compatible([good], ours, 16)
    longer = OpenedSource(make_source(tmp_path / "long", 2, 10, seq_len=16))
    with pytest.raises(DataError, match="cannot share a batch"):
        MixedStream([good, longer])


def test_eval_set_gives_ranks_disjoint_contiguous_equal_slices(folders: list[Path]) -> None:
    val = EvalSet(OpenedSource(folders[0], split="val"))
    assert val.rows == 50 and val.batches_per_rank(4, 3) == 4
    per_rank = [[row for x in val.batches(4, r, 3) for _, row in decode(x)] for r in range(3)]
    assert [len(rows) for rows in per_rank] == [16, 16, 16]  # 50 rows: 2 dropped so every rank gets 4 batches
    assert sum(per_rank, []) == list(range(48))
    assert [row for x in val.batches(6, 0, 2) for _, row in decode(x)] == list(range(24))
    first = EvalSet(OpenedSource(folders[1], split="val"), rows=8)
    assert [decode(x) for x in first.batches(4, 1, 2)] == [[(1, 4), (1, 5), (1, 6), (1, 7)]]
    with pytest.raises(DataError, match="fewer than one batch"):
        next(first.batches(8, 0, 2))


def test_describe_and_open_sources(folders: list[Path]) -> None:
    config = DataConfig(sources=tuple(map(str, folders)), weights=(0.95, 0.05), names=("law", "web"))
    sources = open_sources(config)
    text = MixedStream(sources, config.weights, config.seed).describe(1000)
    assert text.splitlines() == ["law: 200 rows (1,600 tokens), weight 0.9500, 950 samples = 4.75 epochs",
                                 "web: 37 rows (296 tokens), weight 0.0500, 50 samples = 1.35 epochs"]
    assert [s.rows for s in open_sources(config, "val")] == [50, 10]


def _open_files(folder: Path) -> int:
    """This process's open descriptors on files under `folder` (what ulimit -n counts)."""
    fds = Path("/proc/self/fd")
    return sum(1 for fd in fds.iterdir() if str(folder) in str(fd.resolve(strict=False)))


def test_open_shard_readers_are_bounded_and_the_rows_do_not_change(tmp_path: Path) -> None:
    folder = make_source(tmp_path / "many", 0, 400, shard_rows=16)  # 25 shards
    bounded, unbounded = OpenedSource(folder, max_open=3), OpenedSource(folder, max_open=1000)
    order = np.random.default_rng(0).permutation(400)
    peak = 0
    for i in order:
        assert (bounded.get(int(i)) == unbounded.get(int(i))).all()
        peak = max(peak, _open_files(folder) - len(unbounded._open))
    assert len(bounded._open) == 3 and len(unbounded._open) == 25
    assert peak <= 3, f"{peak} shard files open at once with max_open=3"
    assert bounded.readers_opened > 25, "evicted readers were reopened when their shard came round again"
    bounded.close()
    with pytest.raises(ValueError, match="max_open must be at least 1"):
        OpenedSource(folder, max_open=0)
    with pytest.raises(ValueError, match="^max_open_shards must"):
        DataConfig(max_open_shards=0)


def test_prefetched_batches_are_the_stream_s_own_and_a_jump_reads_synchronously(folders: list[Path]) -> None:
    from training.prefetch import Prefetcher

    world, micro_batch, accum = 2, 3, 2
    plain, fetched = stream(folders), stream(folders)
    batches = Prefetcher(fetched, 1, world, micro_batch, accum)
    got = []
    for _ in range(4):
        for m in range(accum):
            rows, ids = batches.next_batch(m)
            assert ids == decode(rows) == plain.next_batch(m, 1, world, micro_batch, accum)[1]
            got.append(ids)
        plain.advance(world * micro_batch * accum)
        fetched.advance(world * micro_batch * accum)
    assert (batches.hits, batches.misses) == (7, 1)  # all but the first were read ahead
    fetched.load_state_dict(stream(folders).state_dict())  # a resume elsewhere: the pending batch is not it
    assert batches.next_batch(0)[1] == got[0] and batches.misses == 2
    batches.close()
    off = Prefetcher(stream(folders), 1, world, micro_batch, accum, enabled=False)
    assert [off.next_batch(m)[1] for m in range(accum)] == got[:2] and off.hits == 0
