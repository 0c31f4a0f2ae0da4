"""The bucketed dedup of the shard stage (map -> dedup buckets -> cluster) drops exactly the documents the
single-process reference (`sharding.dedup.find_duplicates`) drops, for the same reasons and originals, for 1, 4
and 16 map tasks and two bucket counts, in a first round and in a round deduplicated against it; and the shards
are the same bytes whatever the task and bucket counts."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from launcher.run_config import load_run_config
from sharding.buckets import KeySpace, KeySpaceError
from sharding.config import ShardConfig
from sharding.dedup import Rows, find_duplicates
from sharding.dedup_index import Previous
from sharding.minhash import MinHasher
from sharding.reduce import DROPS, cluster_pairs, dedup_bucket, finish, pack_step, run_all
from sharding.stage import INPUTS, WORK, assign_by_size, map_files, work_files
from sharding.tokenize import train_bpe_tokenizer

VOCAB = [f"w{i}" for i in range(300)]
FILES = 20


def corpus(seed: int, docs: int) -> list[str]:
    """Originals, exact copies, near copies (a word or two changed: around the threshold), short documents."""
    rng = random.Random(seed)
    originals = [" ".join(rng.choice(VOCAB) for _ in range(rng.randint(20, 40))) for _ in range(docs // 12)]
    texts = []
    for _ in range(docs):
        base = rng.choice(originals)
        kind = rng.random()
        if kind < 0.3:
            texts.append(base)
        elif kind < 0.8:
            words = base.split()
            for _ in range(rng.randint(1, 3)):
                words[rng.randrange(len(words))] = rng.choice(VOCAB)
            texts.append(" ".join(words))
        elif kind < 0.9:
            texts.append(" ".join(rng.choice(VOCAB) for _ in range(rng.randint(1, 4))))
        else:
            texts.append(" ".join(rng.choice(VOCAB) for _ in range(30)))
    return texts


def write_corpus(folder: Path, texts: list[str]) -> list[list[str]]:
    """`texts` over FILES JSONL files, in order; returns each file's texts."""
    folder.mkdir(parents=True)
    per_file = [texts[i::FILES] for i in range(FILES)]
    for i, part in enumerate(per_file):
        (folder / f"{i:03d}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
    return per_file


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_bpe_tokenizer(VOCAB * 3, 400, tmp_path_factory.mktemp("tokenizer"))


def config(inputs: Path, tokenizer: Path, tasks: int, buckets: int, previous: tuple[Path, ...] = ()) -> ShardConfig:
    return load_run_config(None, [
        f"shard.inputs={json.dumps([str(inputs / '*.jsonl')])}", f"shard.tokenizer={tokenizer}", "shard.seq_len=16",
        "shard.val_fraction=0.2", "shard.shard_sequences=8", "shard.clean.steps=[]", "shard.encode_batch=4",
        "shard.threads=1", f"shard.tasks={tasks}", f"shard.dedup.buckets={buckets}",
        f"shard.dedup.previous={json.dumps([str(p) for p in previous])}"]).shard


def staged_drops(cfg: ShardConfig, out: Path) -> dict[tuple[int, int], tuple[str, tuple[int, int] | None]]:
    """(file, record) -> (reason, (file, record) of the original, None for an earlier round's), from the stage."""
    for rank in range(cfg.tasks):
        map_files(cfg, out, rank, cfg.tasks)
    for bucket in range(cfg.dedup.buckets):
        dedup_bucket(cfg, out, bucket)
    cluster_pairs(cfg, out)
    base = json.loads((out / WORK / "cluster.json").read_text())["base"]
    space = KeySpace(base, FILES)
    reasons = ("dedup.exact", "dedup.exact_previous_round", "dedup.near", "dedup.near_previous_round")
    found = {}
    for key, rep, reason in np.load(out / WORK / DROPS):
        where = (int(space.unit_of(key)), int(space.row_of(key)))
        original = None if rep < base else (int(space.unit_of(rep)), int(space.row_of(rep)))
        found[where] = (reasons[reason], original)
    return found


def reference_drops(cfg: ShardConfig, per_file: list[list[str]], previous: list[str]) -> dict[tuple[int, int], tuple[
        str, tuple[int, int] | None]]:
    hasher = MinHasher(cfg.dedup.minhash)
    order = [(f, r) for f, texts in enumerate(per_file) for r in range(len(texts))]
    verdict = find_duplicates(cfg.dedup, Rows.of(previous, hasher), Rows.of([per_file[f][r] for f, r in order],
                                                                            hasher))
    return {order[row]: (reason, None if rep < 0 else order[rep]) for row, reason, rep in verdict.dropped()}


def kept_texts(per_file: list[list[str]], drops: dict[tuple[int, int], object]) -> list[str]:
    return [t for f, texts in enumerate(per_file) for r, t in enumerate(texts) if (f, r) not in drops]


@pytest.fixture(scope="module")
def rounds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[str]], Path, list[list[str]]]:
    root = tmp_path_factory.mktemp("rounds")
    first = write_corpus(root / "round1", corpus(1, 500))
    second = write_corpus(root / "round2", corpus(1, 200)[:100] + corpus(2, 300))  # a third repeats round 1's
    return root / "round1", first, root / "round2", second


@pytest.mark.parametrize("buckets", [3, 16])
@pytest.mark.parametrize("tasks", [1, 4, 16])
def test_survivors_equal_the_single_process_dedup_for_any_task_and_bucket_count(
        tmp_path: Path, tokenizer: Path, rounds: tuple[Path, list[list[str]], Path, list[list[str]]],
        tasks: int, buckets: int) -> None:
    inputs, per_file, _, _ = rounds
    cfg = config(inputs, tokenizer, tasks, buckets)
    expected = reference_drops(cfg, per_file, [])
    assert {r for r, _ in expected.values()} == {"dedup.exact", "dedup.near"}  # both kinds are exercised
    assert 50 < len(expected) < 450
    assert staged_drops(cfg, tmp_path / "out") == expected


def test_a_later_round_against_the_bucketed_index_equals_the_reference(
        tmp_path: Path, tokenizer: Path, rounds: tuple[Path, list[list[str]], Path, list[list[str]]]) -> None:
    inputs1, first, inputs2, second = rounds
    round1 = tmp_path / "round1"
    run_all(config(inputs1, tokenizer, 4, 4), round1, "h")
    kept1 = kept_texts(first, reference_drops(config(inputs1, tokenizer, 1, 1), first, []))
    results = []
    for tasks, buckets in ((1, 4), (16, 8)):  # 8 buckets read the index written with 4 through its bucket b % 4
        cfg = config(inputs2, tokenizer, tasks, buckets, (round1,))
        found = staged_drops(cfg, tmp_path / f"round2-{tasks}-{buckets}")
        assert found == reference_drops(cfg, second, kept1)
        assert any(reason.endswith("_previous_round") for reason, _ in found.values())
        for rank in range(tasks):
            pack_step(cfg, tmp_path / f"round2-{tasks}-{buckets}", rank, tasks)
        results.append(finish(cfg, tmp_path / f"round2-{tasks}-{buckets}", "h"))
    assert results[0] == results[1]


def test_shards_and_index_are_the_same_bytes_for_any_task_and_bucket_count(
        tmp_path: Path, tokenizer: Path, rounds: tuple[Path, list[list[str]], Path, list[list[str]]]) -> None:
    inputs, _, _, _ = rounds
    outputs = []
    for tasks, buckets in ((1, 1), (16, 16)):
        out = tmp_path / f"out-{tasks}-{buckets}"
        stats = run_all(config(inputs, tokenizer, tasks, buckets), out, "h")
        shards = {p.name: p.read_bytes() for p in sorted(out.glob("*.arrow"))}
        outputs.append((stats, shards, (out / "manifest.json").read_bytes()))
    assert outputs[0][0] == outputs[1][0] and outputs[0][1] == outputs[1][1]
    assert len(outputs[0][1]) >= 2
    # The index parts differ in layout (1 or 16 buckets); both are read by a later round equally (test above).


def test_a_rerun_with_another_bucket_count_never_mixes_in_the_old_pairs(
        tmp_path: Path, tokenizer: Path, rounds: tuple[Path, list[list[str]], Path, list[list[str]]]) -> None:
    inputs, per_file, _, _ = rounds
    out = tmp_path / "out"
    two = config(inputs, tokenizer, 2, 2)
    for rank in range(2):
        map_files(two, out, rank, 2)
    for bucket in range(2):
        dedup_bucket(two, out, bucket)
    four = config(inputs, tokenizer, 2, 4)  # the rerun raised the buckets: the map's files are read through b % 2
    assert staged_drops(four, out) == reference_drops(four, per_file, [])
    three = config(inputs, tokenizer, 2, 3)
    with pytest.raises(ValueError, match=r"written with 2 dedup buckets, which does not divide shard.dedup.buckets"):
        dedup_bucket(three, out, 0)


def test_an_index_of_a_bucket_count_that_does_not_divide_is_refused(
        tmp_path: Path, tokenizer: Path, rounds: tuple[Path, list[list[str]], Path, list[list[str]]]) -> None:
    inputs1, _, inputs2, _ = rounds
    run_all(config(inputs1, tokenizer, 2, 4), tmp_path / "round1", "h")
    cfg = config(inputs2, tokenizer, 2, 6, (tmp_path / "round1",))
    map_files(cfg, tmp_path / "round2", 0, 1)
    with pytest.raises(ValueError, match=r"written with 4 dedup buckets, which does not divide shard.dedup.buckets"):
        dedup_bucket(cfg, tmp_path / "round2", 0)


def test_keys_never_overflow_and_a_full_key_space_is_refused() -> None:
    space = KeySpace(base=0, units=(1 << 24) - 1)
    assert space.end < 1 << 64 and space.offset(5) == 5 << 32
    keys = np.array([space.offset(3) + 7, space.offset(10**6) + 2**32 - 1], np.uint64)
    assert space.unit_of(keys).tolist() == [3, 10**6] and space.row_of(keys).tolist() == [7, 2**32 - 1]
    with pytest.raises(KeySpaceError, match="past 2\\^64"):
        KeySpace(base=(1 << 64) - (1 << 40), units=1 << 10)


def test_a_damaged_index_part_is_refused_by_inspect_and_by_the_next_round(
        tmp_path: Path, tokenizer: Path, rounds: tuple[Path, list[list[str]], Path, list[list[str]]],
        capsys: pytest.CaptureFixture[str]) -> None:
    from launcher.cli import main

    inputs1, _, inputs2, _ = rounds
    folder = tmp_path / "round1"
    run_all(config(inputs1, tokenizer, 2, 2), folder, "h")
    assert main(["inspect", str(folder), "--verify"]) == 0
    capsys.readouterr()
    part = folder / "dedup-index" / "000007.sigs.u32"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0x04  # same size: only the hash can tell
    part.write_bytes(bytes(data))
    assert main(["inspect", str(folder), "--verify"]) == 1
    assert "BAD dedup-index/000007.sigs.u32: XXH3 differs from the index" in capsys.readouterr().out
    cfg = config(inputs2, tokenizer, 2, 2, (folder,))
    round2 = tmp_path / "round2"
    with pytest.raises(ValueError, match=r"^shard.dedup.previous: .*000007.sigs.u32: XXH3 differs from the index"):
        for rank in range(2):  # each map element checks its share of the parts before it reads any input
            map_files(cfg, round2, rank, 2)
    recorded = json.loads((round2 / INPUTS).read_text())["files"]
    element_1 = assign_by_size([e["size"] for e in recorded], 2)[1]
    assert element_1 and not any(work_files(round2, i).tally.exists() for i in element_1)  # it mapped nothing
    with pytest.raises(RuntimeError, match=r"parts of the earlier rounds' index were not checked by the map"):
        dedup_bucket(cfg, round2, 0)  # no dedup element reads a part the map did not check
    (folder / "dedup-index" / "index.json").write_text("{}")
    with pytest.raises(ValueError, match=r"index.json: 2 bytes, manifest says .*cannot be trusted"):
        Previous.load([folder], cfg.dedup.minhash)


def test_an_input_file_with_no_kept_document_leaves_the_index_readable(tmp_path: Path, tokenizer: Path) -> None:
    rng = random.Random(5)
    originals = [" ".join(rng.choice(VOCAB) for _ in range(30)) for _ in range(40)]
    first = tmp_path / "in1"
    first.mkdir()
    files = [originals[:20], originals[:20], originals[20:]]  # file 1: copies of file 0 only, none kept
    for i, texts in enumerate(files):
        (first / f"{i}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    round1 = tmp_path / "round1"
    cfg1 = config(first, tokenizer, 1, 2)
    run_all(cfg1, round1, "h")
    second = tmp_path / "in2"
    second.mkdir()
    edited = [" ".join(["changed", *t.split()[1:]]) for t in originals]  # near copies of file 0's and file 2's
    (second / "0.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in edited))
    cfg2 = config(second, tokenizer, 1, 2, (round1,))
    found = staged_drops(cfg2, tmp_path / "round2")
    assert found == reference_drops(cfg2, [edited], kept_texts(files, reference_drops(cfg1, files, [])))
    assert {reason for reason, _ in found.values()} == {"dedup.near_previous_round"}
