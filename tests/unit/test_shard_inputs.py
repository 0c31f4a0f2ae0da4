"""The shard stage is bound to the input files it started with: its steps (map, dedup, cluster, pack, finish) run
in-process on tiny JSONL inputs, and a file added, removed or changed between attempts (or after the stage completed)
is refused by name."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

import common.publish as publish
import sharding.stage as stage
from launcher.run_config import load_run_config
from sharding.config import ShardConfig
from sharding.readers import expand_inputs
from sharding.reduce import CLUSTER, cluster_pairs, dedup_bucket, finish, pack_step
from sharding.stage import COMPLETE, WORK, map_files, work_files
from sharding.tokenize import train_bpe_tokenizer

WORDS = ["amber", "basalt", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "iris", "juniper", "kelp", "lagoon",
         "meadow", "nectar", "onyx", "prairie", "quartz", "river", "sable", "tundra", "umber", "violet", "willow"]


def text(n: int) -> str:
    """A distinct short document: no two share enough words to be near duplicates."""
    return " ".join(f"{WORDS[(n * 7 + k * 3) % len(WORDS)]}{n}x{k}" for k in range(12))


def write_jsonl(path: Path, first: int, count: int = 6) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": text(n)}) + "\n" for n in range(first, first + count)))
    return path


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    return train_bpe_tokenizer((text(n) for n in range(200)), 300, folder)


def config(inputs: Path, tokenizer: Path) -> ShardConfig:
    return load_run_config(None, [f"shard.inputs={json.dumps([str(inputs / '*.jsonl')])}",
                                  f"shard.tokenizer={tokenizer}", "shard.seq_len=16", "shard.val_fraction=0.2",
                                  "shard.shard_sequences=8", 'shard.clean.steps=["normalize"]',
                                  "shard.encode_batch=4", "shard.threads=1"]).shard


def shard_files(out: Path) -> dict[str, bytes]:
    """Every file of the stage folder (the dedup index's parts too), by its path inside it."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def after_map(cfg: ShardConfig, out: Path) -> dict[str, object]:
    """The steps after the map, as the launcher runs them: dedup for every bucket, cluster, pack for every
    rank, finish; finish's stats."""
    for bucket in range(cfg.dedup.buckets):
        dedup_bucket(cfg, out, bucket)
    cluster_pairs(cfg, out)
    for rank in range(cfg.tasks):
        pack_step(cfg, out, rank, cfg.tasks)
    return finish(cfg, out, "data-hash")


def run_stage(cfg: ShardConfig, out: Path, world: int = 2) -> dict[str, object]:
    for rank in range(world):
        map_files(cfg, out, rank, world)
    return after_map(cfg, out)


def test_a_file_added_between_map_attempts_is_refused_by_name_and_nothing_is_lost(tmp_path: Path,
                                                                                 tokenizer: Path) -> None:
    inputs = tmp_path / "in"
    write_jsonl(inputs / "a.jsonl", 0)
    write_jsonl(inputs / "c.jsonl", 10)
    cfg, out = config(inputs, tokenizer), tmp_path / "shard"
    shares = stage.assign_by_size([(inputs / n).stat().st_size for n in ("a.jsonl", "c.jsonl")], 2)
    a_rank = 0 if 0 in shares[0] else 1
    map_files(cfg, out, a_rank, 2)  # the element that has a.jsonl (input 0) does it and records the inputs
    added = write_jsonl(inputs / "b.jsonl", 20)  # sorts between them: input 1 would now be b.jsonl
    with pytest.raises(ValueError) as refused:
        map_files(cfg, out, 1 - a_rank, 2)
    message = str(refused.value)
    assert str(added) in message and "1 added" in message
    assert "no work file" in message and "shard.dedup.previous" in message and "run.name" in message
    assert not work_files(out, 1).tally.exists() and not work_files(out, 2).tally.exists()  # b.jsonl never read
    with pytest.raises(ValueError, match="1 added"):
        cluster_pairs(cfg, out)  # the cluster step, which checks every input, refuses it too
    added.unlink()  # back to the recorded inputs: the stage finishes with every original document, once
    map_files(cfg, out, 1 - a_rank, 2)
    for bucket in range(cfg.dedup.buckets):
        dedup_bucket(cfg, out, bucket)
    added = write_jsonl(inputs / "b.jsonl", 20)  # added again once the map is done: the cluster step refuses it
    with pytest.raises(ValueError) as refused:
        cluster_pairs(cfg, out)
    assert str(added) in str(refused.value) and "1 added" in str(refused.value)
    assert not (out / WORK / CLUSTER).exists()  # nothing of the cluster step was written
    added.unlink()
    stats = after_map(cfg, out)
    assert stats["docs_in"] == stats["docs_kept"] == 12


def test_a_completed_stage_rerun_after_its_inputs_changed_is_refused(tmp_path: Path, tokenizer: Path) -> None:
    inputs = tmp_path / "in"
    write_jsonl(inputs / "a.jsonl", 0)
    changed = write_jsonl(inputs / "b.jsonl", 10)
    cfg, out = config(inputs, tokenizer), tmp_path / "shard"
    run_stage(cfg, out)
    assert (out / COMPLETE).exists()
    before = shard_files(out)
    write_jsonl(changed, 10, count=7)  # one more record: resized
    new = write_jsonl(inputs / "z.jsonl", 30)
    with pytest.raises(ValueError) as refused:
        finish(cfg, out, "data-hash")
    message = str(refused.value)
    assert "1 added" in message and str(new) in message and "1 resized" in message and str(changed) in message
    with pytest.raises(ValueError, match="1 resized"):
        cluster_pairs(cfg, out)
    with pytest.raises(ValueError, match="1 resized"):
        map_files(cfg, out, 0, 2)
    with pytest.raises(ValueError, match="1 added"):
        stage.check_recorded_inputs(cfg, out)  # for the launcher's preflight
    assert shard_files(out) == before  # the finished shards are left as they are


def test_unchanged_inputs_rerun_every_element_and_the_later_steps_to_identical_shards(tmp_path: Path,
                                                                                       tokenizer: Path) -> None:
    inputs = tmp_path / "in"
    for i in range(3):
        write_jsonl(inputs / f"part-{i}.jsonl", 10 * i)
    cfg = config(inputs, tokenizer)
    reference = tmp_path / "reference"
    run_stage(cfg, reference, world=1)
    out = tmp_path / "shard"
    for rank in range(2):
        map_files(cfg, out, rank, 2)
    recorded = json.loads((out / stage.INPUTS).read_text())
    files = expand_inputs(cfg.inputs)
    assert [e["path"] for e in recorded["files"]] == [str(p) for p in files]
    assert [(e["size"], e["mtime_ns"]) for e in recorded["files"]] == \
        [(os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in files]
    for i in range(len(files)):  # each tally names the file it was made from
        assert json.loads(work_files(out, i).tally.read_text())["source"] == recorded["files"][i]
    owner = 0 if 1 in stage.assign_by_size([e["size"] for e in recorded["files"]], 2)[0] else 1
    work_files(out, 1).tally.unlink()  # a killed attempt of input 1's element: its second attempt redoes that file
    assert map_files(cfg, out, 1 - owner, 2) == {"units": 0}  # all of its files are done
    assert map_files(cfg, out, owner, 2) == {"units": 1}
    stats = after_map(cfg, out)
    assert stats["docs_in"] == stats["docs_kept"] == 18
    assert shard_files(out) == shard_files(reference)
    assert after_map(cfg, out) == stats  # a rerun of the completed stage: the same answer
    assert map_files(cfg, out, 0, 2) == {"skipped": "stage already complete"}
    assert shard_files(out) == shard_files(reference)


def test_the_recorded_list_is_written_once_when_elements_race(tmp_path: Path, tokenizer: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = tmp_path / "in"
    write_jsonl(inputs / "a.jsonl", 0)
    write_jsonl(inputs / "b.jsonl", 10)
    cfg, out = config(inputs, tokenizer), tmp_path / "shard"
    out.mkdir()
    target = out / stage.INPUTS
    # Elements on several nodes have distinct temp names (host, pid); threads here get one each.
    monkeypatch.setattr(publish, "temp_path", lambda p: p.with_name(f".{p.name}.tmp.{threading.get_ident()}"))
    barrier, won = threading.Barrier(8), []

    def element(n: int) -> None:
        barrier.wait()
        if publish.publish_json_once(target, {"writer": n, "filler": "x" * 100_000}):
            won.append(n)

    threads = [threading.Thread(target=element, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and json.loads(target.read_text())["writer"] == won[0]  # one writer's whole file
    assert sorted(p.name for p in out.iterdir()) == [stage.INPUTS]  # no temp left behind
    target.unlink()

    listing = stage.stat_inputs(expand_inputs(cfg.inputs))
    assert stage.record_inputs(out, cfg.inputs, listing) == listing  # the first element records the list
    written = target.stat()
    assert stage.record_inputs(out, cfg.inputs, listing) == listing  # a second: it compares, agrees
    monkeypatch.setattr(Path, "exists", lambda self: False)  # a second that looked before the first published
    assert stage.record_inputs(out, cfg.inputs, listing) == listing
    with pytest.raises(ValueError, match="1 removed"):  # a second whose expansion missed a file is refused
        stage.record_inputs(out, cfg.inputs, listing[:1])
    monkeypatch.undo()
    assert (target.stat().st_ino, target.stat().st_mtime_ns) == (written.st_ino, written.st_mtime_ns)
    assert sorted(p.name for p in out.iterdir()) == [stage.INPUTS]


def test_the_error_names_each_kind_of_change_with_counts(tmp_path: Path, tokenizer: Path) -> None:
    inputs = tmp_path / "in"
    for i in range(6):
        write_jsonl(inputs / f"part-{i}.jsonl", 10 * i)
    cfg, out = config(inputs, tokenizer), tmp_path / "shard"
    map_files(cfg, out, 0, 3)
    (inputs / "part-0.jsonl").rename(inputs / "renamed-0.jsonl")  # a rename: one removed, one added
    (inputs / "part-1.jsonl").unlink()
    stat = (inputs / "part-2.jsonl").stat()
    os.utime(inputs / "part-2.jsonl", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same size, modified
    for i in range(5):
        write_jsonl(inputs / f"new-{i}.jsonl", 100 + 10 * i)
    with pytest.raises(ValueError) as refused:
        map_files(cfg, out, 1, 3)
    message = str(refused.value)
    assert "6 added" in message and "2 removed" in message and "1 modified" in message
    assert str(inputs / "part-1.jsonl") in message and str(inputs / "part-2.jsonl") in message
    assert str(inputs / "new-0.jsonl") in message and str(inputs / "new-4.jsonl") not in message  # first few only
    assert str(out) in message


def test_a_file_changed_while_it_is_read_gets_no_tally(tmp_path: Path, tokenizer: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = tmp_path / "in"
    victim = write_jsonl(inputs / "a.jsonl", 0)
    cfg, out = config(inputs, tokenizer), tmp_path / "shard"
    read_file = stage.read_file

    def appending(path: Path, *args: object, **kwargs: object) -> object:
        yield from read_file(path, *args, **kwargs)  # type: ignore[arg-type]
        with path.open("a") as f:  # another writer appends once the reader is past the end
            f.write(json.dumps({"text": text(99)}) + "\n")

    monkeypatch.setattr(stage, "read_file", appending)
    with pytest.raises(ValueError, match="changed while it was read") as refused:
        map_files(cfg, out, 0, 1)
    assert str(victim) in str(refused.value) and not work_files(out, 0).tally.exists()
    monkeypatch.undo()
    with pytest.raises(ValueError, match="1 resized"):  # and every later attempt sees it differs from the record
        map_files(cfg, out, 0, 1)


def test_a_rerun_of_a_completed_run_whose_inputs_changed_is_refused_before_anything_is_queued(
        tmp_path: Path, tokenizer: Path) -> None:
    """The launcher skips a completed stage without running it: the run's preflight is what notices."""
    from launcher.layout import RunLayout
    from launcher.pipeline import PreflightError, preflight

    inputs = tmp_path / "in"
    inputs.mkdir()
    write_jsonl(inputs / "a.jsonl", 0)
    overrides = [f"run.root={tmp_path / 'runs'}", "run.name=bound", 'run.stages=["shard"]',
                 f"shard.inputs={json.dumps([str(inputs / '*.jsonl')])}", f"shard.tokenizer={tokenizer}",
                 "shard.seq_len=16", "shard.val_fraction=0.2", "shard.shard_sequences=8",
                 'shard.clean.steps=["normalize"]', "shard.encode_batch=4", "shard.threads=1"]
    cfg = load_run_config(None, overrides)
    out = RunLayout(cfg.run_dir.resolve()).stage("shard")
    out.mkdir(parents=True)
    run_stage(cfg.shard, out)
    preflight(cfg)  # unchanged inputs: fine
    write_jsonl(inputs / "b.jsonl", 100)
    with pytest.raises(PreflightError, match=r"shard: .*1 added \(.*b\.jsonl\)"):
        preflight(cfg)


def test_a_map_element_stats_only_its_own_files_once_the_list_is_recorded(
        tmp_path: Path, tokenizer: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """N files cost N/world stats per element, not N; a change to another element's file is still caught by
    that element, and by the cluster step, which checks every file."""
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    out.mkdir()
    for i in range(8):
        write_jsonl(inputs / f"{i}.jsonl", 10 * i)
    cfg = config(inputs, tokenizer)
    shares = stage.assign_by_size([(inputs / f"{i}.jsonl").stat().st_size for i in range(8)], 4)
    assert sorted(i for share in shares for i in share) == list(range(8)) and all(len(s) == 2 for s in shares)
    owner = {i: rank for rank, share in enumerate(shares) for i in share}

    def own(rank: int) -> Any:
        return lambda recorded: stage.assign_by_size([e["size"] for e in recorded], 4)[rank]

    stage.bind_inputs(cfg, out, own=own(0))  # element 0 records all 8
    calls: list[object] = []
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda *a, **k: calls.append(a[0]) or real_stat(*a, **k))
    stage.bind_inputs(cfg, out, own=own(1))
    monkeypatch.undo()
    assert sorted(Path(str(c)).name for c in calls if str(c).endswith(".jsonl")) == [f"{i}.jsonl" for i in shares[1]]
    write_jsonl(inputs / "6.jsonl", 60, count=9)  # element owner[6]'s file grows
    stage.bind_inputs(cfg, out, own=own((owner[6] + 1) % 4))  # not that element's business
    with pytest.raises(stage.InputsChanged, match=r"1 resized \(.*6\.jsonl"):
        stage.bind_inputs(cfg, out, own=own(owner[6]))
    with pytest.raises(stage.InputsChanged, match=r"1 resized"):
        stage.bind_inputs(cfg, out)  # as the cluster step binds them: every file
    with pytest.raises(stage.InputsChanged, match=r"1 resized \(.*6\.jsonl"):
        cluster_pairs(cfg, out)


def test_map_elements_share_the_input_bytes_by_size_not_by_index() -> None:
    # File i % 2 would give element 0 both large files (200 of 204 bytes); by size each element gets one.
    sizes = [100, 1, 100, 1, 1, 1]
    assert stage.assign_by_size(sizes, 2) == [[0, 1, 4], [2, 3, 5]]
    assert stage.assign_by_size([0, 0, 0], 3) == [[0], [1], [2]]  # empty files too: one each, none left idle
    assert stage.assign_by_size([5, 5], 4) == [[0], [1], [], []]  # more elements than files: the first ones
    shares = stage.assign_by_size(list(range(1000, 0, -3)), 7)
    loads = [sum(range(1000, 0, -3)[i] for i in share) for share in shares]
    assert max(loads) - min(loads) <= 1000 and sorted(i for s in shares for i in s) == list(range(334))
