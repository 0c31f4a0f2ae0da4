from __future__ import annotations

import json
import math
import multiprocessing
import os
import random
import signal
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from common.checksum import xxh3_bytes
from common.publish import temp_path
from tests.conftest import free_port
from training.checkpoint import (
    COMPLETE,
    LATEST,
    SET_ASIDE,
    Checkpointer,
    CheckpointUnreadable,
    CheckpointWarning,
    set_aside_checkpoints,
    step_dir_name,
)
from training.rng import capture_rng, restore_rng, rng_file
from training.train_state import TrainState


def _files(payload: bytes) -> Callable[[Path], None]:
    """A stand-in for the trainer's write callback: a few files, one in a subdirectory."""

    def write(folder: Path) -> None:
        (folder / "model.bin").write_bytes(payload)
        (folder / "optim").mkdir(exist_ok=True)
        (folder / "optim" / "rank0.bin").write_bytes(payload * 2)
        (folder / "client.json").write_text(json.dumps({"payload": payload.decode()}))

    return write


def _stale_tmp(root: Path, step: int) -> None:
    """What a save killed after its write callbacks leaves: files, no COMPLETE."""
    tmp = root / f"{step_dir_name(step)}.tmp"
    tmp.mkdir(parents=True)
    _files(b"stale")(tmp)


def _ckpt(root: Path, keep_last: int = 3) -> Checkpointer:
    return Checkpointer(root, keep_last=keep_last, rank=0, world=1, barrier=lambda: None)


def _latest(ckpt: Checkpointer) -> tuple[Path | None, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = ckpt.latest_valid()
    return found, [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]


def test_save_publishes_a_complete_checkpoint(tmp_path: Path) -> None:
    ckpt = _ckpt(tmp_path / "ckpt")
    path = ckpt.save(10, _files(b"abc"), metric=2.5)
    assert path == tmp_path / "ckpt" / "step-0000000010" and path.is_dir()
    info = json.loads((path / COMPLETE).read_text())
    assert info["step"] == 10 and info["metric"] == 2.5
    client = b'{"payload": "abc"}'
    assert info["version"] == 2 and info["files"] == {
        "client.json": {"bytes": len(client), "xxh3": xxh3_bytes(client), "rank": 0},
        "model.bin": {"bytes": 3, "xxh3": xxh3_bytes(b"abc"), "rank": 0},
        "optim/rank0.bin": {"bytes": 6, "xxh3": xxh3_bytes(b"abcabc"), "rank": 0}}
    assert (tmp_path / "ckpt" / LATEST).read_text().strip() == "step-0000000010"
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [LATEST, "step-0000000010"]
    assert ckpt.verify(path) == []
    assert _latest(ckpt) == (path, [])


def test_empty_or_missing_root_has_no_checkpoint(tmp_path: Path) -> None:
    assert _latest(_ckpt(tmp_path / "nothing")) == (None, [])


def _break(path: Path, how: str) -> None:
    if how == "no COMPLETE":
        (path / COMPLETE).unlink()
    elif how == "missing file":
        (path / "optim" / "rank0.bin").unlink()
    elif how == "wrong size":
        (path / "model.bin").write_bytes(b"x")
    elif how == "corrupt COMPLETE":
        (path / COMPLETE).write_text('{"step": 30, "fil')
    elif how == "COMPLETE of another step":
        info = json.loads((path / COMPLETE).read_text())
        (path / COMPLETE).write_text(json.dumps({**info, "step": 29}))


@pytest.mark.parametrize(("how", "expected"), [
    ("no COMPLETE", "checkpoint step-0000000030 is damaged (no COMPLETE); set aside as step-0000000030.bad"),
    ("missing file", "checkpoint step-0000000030 is damaged (missing file optim/rank0.bin); set aside as "),
    ("wrong size", "checkpoint step-0000000030 is damaged (model.bin has 1 bytes, COMPLETE lists 3); set aside "),
    ("corrupt COMPLETE", "checkpoint step-0000000030 is damaged (COMPLETE is unreadable: "),
    ("COMPLETE of another step", "checkpoint step-0000000030 is damaged (COMPLETE is for step 29, not 30)"),
])
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_used(tmp_path: Path, how: str,
                                                                            expected: str) -> None:
    ckpt = _ckpt(tmp_path)
    for step in (10, 20, 30):
        ckpt.save(step, _files(b"abc"))
    _break(tmp_path / step_dir_name(30), how)
    problems = ckpt.verify(tmp_path / step_dir_name(30))  # what the --verify CLI will print
    found, warned = _latest(ckpt)
    assert found == tmp_path / step_dir_name(20)
    assert len(warned) == 1 and warned[0].startswith(expected)
    bad = tmp_path / "step-0000000030.bad"
    assert json.loads((bad / SET_ASIDE).read_text())["problems"] == problems and problems
    assert set_aside_checkpoints(tmp_path) == [(bad.name, problems)]
    ckpt.save(40, _files(b"abc"))
    ckpt.save(50, _files(b"abc"))
    assert bad.is_dir(), "pruning never deletes a checkpoint set aside"


def test_an_unpublished_tmp_is_ignored_and_latest_is_not_trusted(tmp_path: Path) -> None:
    ckpt = _ckpt(tmp_path)
    ckpt.save(10, _files(b"abc"))
    _stale_tmp(tmp_path, 20)
    (tmp_path / LATEST).write_text("step-0000000020\n")  # as if a tool had pointed it at something unusable
    assert _latest(ckpt) == (tmp_path / step_dir_name(10), [])


def test_all_checkpoints_damaged(tmp_path: Path) -> None:
    ckpt = _ckpt(tmp_path)
    ckpt.save(10, _files(b"abc"))
    _break(tmp_path / step_dir_name(10), "no COMPLETE")
    found, warned = _latest(ckpt)
    assert found is None and warned == ["checkpoint step-0000000010 is damaged (no COMPLETE); set aside as "
                                        "step-0000000010.bad, using an older one"]


def test_keep_last_plus_the_best(tmp_path: Path) -> None:
    ckpt = _ckpt(tmp_path, keep_last=2)
    metrics = {10: 5.0, 20: 3.0, 30: 4.0, 40: math.nan, 50: None, 60: 7.0}
    for step, metric in metrics.items():
        ckpt.save(step, _files(b"abc"), metric=metric)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == [step_dir_name(s) for s in (20, 50, 60)]
    assert ckpt.best() == tmp_path / step_dir_name(20)
    ckpt.save(70, _files(b"abc"), metric=3.0)
    assert ckpt.best() == tmp_path / step_dir_name(20)  # a tie: the earlier one stays the best
    ckpt.save(80, _files(b"abc"), metric=2.0)
    assert ckpt.best() == tmp_path / step_dir_name(80)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == [step_dir_name(s) for s in (70, 80)]


def test_prune_removes_garbage_older_than_the_newest_checkpoint_only(tmp_path: Path) -> None:
    ckpt = _ckpt(tmp_path, keep_last=1)
    ckpt.save(10, _files(b"abc"))
    (tmp_path / "step-0000000005.tmp").mkdir()  # killed mid-save long ago
    (tmp_path / "step-0000000007").mkdir()  # damaged (no COMPLETE), older than a valid one: set aside, kept
    (tmp_path / "step-0000000099.tmp").mkdir()  # newer than anything complete: not ours to judge
    (tmp_path / ".LATEST.tmp.node-b.123").write_text("x")  # publish_bytes killed before its rename (another node)
    temp_path(tmp_path / LATEST).write_text("x")  # ... and on this one
    ckpt.save(20, _files(b"abc"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST, "step-0000000007.bad", "step-0000000020",
                                                          "step-0000000099.tmp"]


def test_saving_a_valid_step_again_keeps_it(tmp_path: Path) -> None:
    ckpt = _ckpt(tmp_path)
    ckpt.save(10, _files(b"abc"))
    with pytest.warns(CheckpointWarning, match="step-0000000010 already exists and is valid; keeping it"):
        path = ckpt.save(10, _files(b"defg"))
    assert (path / "model.bin").read_bytes() == b"abc" and ckpt.verify(path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST, "step-0000000010"]


def test_saving_a_damaged_step_again_replaces_it(tmp_path: Path) -> None:
    ckpt = _ckpt(tmp_path)
    ckpt.save(10, _files(b"abc"))
    _break(tmp_path / step_dir_name(10), "wrong size")
    (tmp_path / "step-0000000010.tmp").mkdir()  # a stale tmp of the same step must not leak into the new one
    (tmp_path / "step-0000000010.tmp" / "stale.bin").write_bytes(b"old")
    path = ckpt.save(10, _files(b"defg"))
    assert (path / "model.bin").read_bytes() == b"defg" and ckpt.verify(path) == []
    assert "stale.bin" not in json.loads((path / COMPLETE).read_text())["files"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST, "step-0000000010", "step-0000000010.bad"]


def _save_until_killed(root: Path, step: int, kill_at: int) -> None:
    """In a forked child: save `step`, SIGKILLing itself before the `kill_at`-th filesystem change or fsync."""
    calls = 0

    def fault(real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        return wrapped

    try:
        for name in ("fsync", "rename", "replace", "mkdir", "unlink", "rmdir"):
            setattr(os, name, fault(getattr(os, name)))
        _ckpt(root, keep_last=1).save(step, _files(b"new"))
    finally:
        os._exit(0)


@pytest.mark.parametrize("scenario", ["new step", "same step, valid", "same step, damaged"])
def test_sigkill_at_every_point_of_a_save_leaves_a_valid_checkpoint(tmp_path: Path, scenario: str) -> None:
    fork = multiprocessing.get_context("fork")
    step = 20 if scenario == "new step" else 10
    for kill_at in range(1, 200):
        root = tmp_path / str(kill_at)
        ckpt = _ckpt(root, keep_last=1)
        if scenario == "same step, damaged":
            _ckpt(root, keep_last=2).save(5, _files(b"old"))
            _ckpt(root, keep_last=2).save(10, _files(b"abc"))
            _break(root / step_dir_name(10), "wrong size")
        else:
            ckpt.save(10, _files(b"old"))
        _stale_tmp(root, step)  # so that the kill also lands in its removal
        child = fork.Process(target=_save_until_killed, args=(root, step, kill_at))
        child.start()
        child.join(30)
        found, warned = _latest(ckpt)
        assert found is not None, f"killed at operation {kill_at}"
        assert all("model.bin has 1 bytes" in w for w in warned), f"killed at {kill_at}: {warned}"  # old damage
        assert (found / "model.bin").read_bytes() in (b"old", b"new")
        ckpt.save(30, _files(b"after"))  # the resumed run's next save cleans up whatever the kill left
        left = sorted(p.name for p in root.iterdir() if not p.name.startswith("step-0000000010.bad"))
        assert left == [LATEST, "step-0000000030"], f"killed at {kill_at}"
        if child.exitcode == 0:  # the save ran to its end before reaching the kill point: all covered
            assert kill_at > 5
            return
        assert child.exitcode == -signal.SIGKILL
    pytest.fail("the save never finished")


def _two_rank_save(rank: int, port: int, root: Path) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    try:
        ckpt = Checkpointer(root, keep_last=2, rank=rank, world=2, barrier=dist.barrier)

        def write(folder: Path) -> list[Path]:
            (folder / f"shard-rank{rank}.bin").write_bytes(bytes([rank]) * (10 + rank))
            rng_file(folder, rank).write_text(json.dumps(capture_rng()))
            if rank == 1:  # written, but not returned: rank 0 hashes what nobody claims
                (folder / "unclaimed.bin").write_bytes(b"u")
            return [folder / f"shard-rank{rank}.bin", rng_file(folder, rank)]

        path = ckpt.save(7, write, metric=1.0)
        ckpt.save(8, write, metric=1.0)
        assert ckpt.choose() == path.with_name(step_dir_name(8))
        dist.barrier()
        if rank == 0:  # a same-size flip in rank 1's own file: only rank 1 re-hashes it
            data = bytearray((root / step_dir_name(8) / "shard-rank1.bin").read_bytes())
            data[3] ^= 0x10
            (root / step_dir_name(8) / "shard-rank1.bin").write_bytes(bytes(data))
        dist.barrier()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert ckpt.choose() == path  # both ranks agree on the previous one
        if rank == 0:
            (message,) = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
            assert "shard-rank1.bin: content hash" in message and "(rank 1 checked it)" in message
            assert (root / "step-0000000008.bad" / "shard-rank1.bin").exists()
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(60)
def test_two_ranks_save_one_checkpoint(tmp_path: Path) -> None:
    mp.spawn(_two_rank_save, args=(free_port(), tmp_path), nprocs=2, join=True)
    info = json.loads((tmp_path / step_dir_name(7) / COMPLETE).read_text())
    assert info["files"].keys() == {"shard-rank0.bin", "shard-rank1.bin", "rng-rank00000.json", "rng-rank00001.json",
                                    "unclaimed.bin"}
    assert info["files"]["shard-rank1.bin"] == {"bytes": 11, "xxh3": xxh3_bytes(b"\x01" * 11), "rank": 1}
    assert info["files"]["rng-rank00001.json"]["rank"] == 1 and info["files"]["unclaimed.bin"]["rank"] == 0
    assert info["world_size"] == 2 and not list((tmp_path / step_dir_name(7)).glob(".files-rank*"))


def test_train_state_round_trip_and_compatibility() -> None:
    state = TrainState(step=120, tokens=983_040, loader={"shard": 3, "offset": [1, 2]},
                       early_stop={"best": 2.1, "bad_evals": 1},
                       manifest_sha256=["a" * 64, "b" * 64], config_sha256="c" * 64, model_fingerprint="llama-1b",
                       tokenizer_sha256="d" * 64, seq_len=2048)
    d = json.loads(json.dumps(state.state_dict()))
    assert d["version"] == 2
    loaded = TrainState()
    loaded.load_state_dict(d)
    assert loaded == state
    changed_config = TrainState(**{**vars(state), "config_sha256": "e" * 64, "manifest_sha256": ["f" * 64]})
    assert state.compatible_with(changed_config) == []
    other = TrainState(**{**vars(state), "tokenizer_sha256": "0" * 64, "seq_len": 4096, "model_fingerprint": "x"})
    reasons = state.compatible_with(other)
    assert len(reasons) == 3
    assert reasons[0].startswith("tokenizer differs")
    assert reasons[1] == "seq_len differs: checkpoint 2048, this run 4096"
    assert reasons[2] == "model differs: checkpoint llama-1b, this run x"


def test_train_state_of_version_1_loads_without_its_never_written_fields() -> None:
    """A checkpoint written before version 2 (scheduler, best_metric, best_step always at their defaults)."""
    current = TrainState(step=7, tokens=70, early_stop={"best": 1.5}, seq_len=16).state_dict()
    old = {**current, "version": 1, "scheduler": {}, "best_metric": None, "best_step": None}
    loaded = TrainState()
    loaded.load_state_dict(old)
    assert loaded.state_dict() == current
    with pytest.raises(ValueError, match="version 2 has unknown fields: scheduler"):
        TrainState().load_state_dict({**current, "scheduler": {}})


@pytest.mark.parametrize(("change", "message"), [
    ({"version": 3}, "train state version 3 is not supported"),
    ({"version": None}, "train state version None is not supported"),
    ({"epoch": 1}, "unknown fields: epoch"),
])
def test_train_state_refuses_what_it_does_not_know(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainState().load_state_dict({**TrainState().state_dict(), **change})
    with pytest.raises(ValueError, match="lacks fields: seq_len"):
        TrainState().load_state_dict({k: v for k, v in TrainState().state_dict().items() if k != "seq_len"})


def _draw() -> tuple[list[float], np.ndarray, torch.Tensor]:
    # Odd counts of Gaussians leave a cached second value in python's and numpy's generators.
    py = [random.random(), random.gauss(0, 1), random.getrandbits(64)]
    return py, np.concatenate([np.random.rand(3), np.random.randn(3)]), torch.cat([torch.rand(4), torch.randn(3)])


def test_rng_round_trip_is_bitwise() -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draw()
    state = json.loads(json.dumps(capture_rng()))  # it is stored as JSON
    first = _draw()
    _draw()
    restore_rng(state)
    again = _draw()
    assert first[0] == again[0]
    assert first[1].tobytes() == again[1].tobytes() and torch.equal(first[2], again[2])
    with pytest.raises(ValueError, match="RNG state version"):
        restore_rng({**state, "version": 9})


def _choose(ckpt: Checkpointer) -> tuple[Path | None, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = ckpt.choose()
    return found, [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]


@pytest.mark.parametrize("damage", ["bit flip", "zeroed block"])
def test_same_size_damage_is_caught_by_the_content_hash_and_set_aside(tmp_path: Path, damage: str) -> None:
    ckpt = _ckpt(tmp_path)
    for step in (10, 20):
        ckpt.save(step, _files(b"0123456789" * 900))
    target = tmp_path / step_dir_name(20) / "optim" / "rank0.bin"
    data = bytearray(target.read_bytes())
    if damage == "bit flip":
        data[4321] ^= 0x04
    else:
        data[4096:8192] = bytes(4096)
    target.write_bytes(bytes(data))
    assert ckpt.verify(tmp_path / step_dir_name(20)) == [], "the sizes alone cannot see it"
    found, warned = _choose(ckpt)
    assert found == tmp_path / step_dir_name(10)
    assert len(warned) == 1 and "optim/rank0.bin: content hash" in warned[0] and "step-0000000020.bad" in warned[0]
    assert (tmp_path / "step-0000000020.bad" / "optim" / "rank0.bin").read_bytes() == bytes(data)  # kept as found


def test_a_checkpoint_of_complete_version_1_is_checked_by_sizes_with_a_warning(tmp_path: Path) -> None:
    ckpt = _ckpt(tmp_path)
    path = ckpt.save(10, _files(b"abc"))
    info = json.loads((path / COMPLETE).read_text())
    (path / COMPLETE).write_text(json.dumps({**info, "version": 1,
                                             "files": {k: v["bytes"] for k, v in info["files"].items()}}))
    found, warned = _choose(ckpt)
    assert found == path and warned == ["checkpoint step-0000000010 predates content hashes: only its file sizes "
                                        "were checked"]


def test_an_io_error_prunes_nothing_and_chooses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = _ckpt(tmp_path, keep_last=1)
    ckpt.save(10, _files(b"abc"), metric=1.0)  # the best
    ckpt.save(20, _files(b"abc"), metric=2.0)
    real_stat = Path.stat

    def flaky_stat(self: Path, *args: Any, **kwargs: Any) -> os.stat_result:  # the filesystem, not our code
        if self.name == "model.bin" and self.parent.name == step_dir_name(10):
            raise OSError(5, "Input/output error")
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", flaky_stat)
    with pytest.warns(CheckpointWarning, match="not pruning .* cannot examine .*model.bin: Input/output error"):
        ckpt.save(30, _files(b"abc"), metric=3.0)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == [step_dir_name(s) for s in (10, 20, 30)]
    ckpt.save(30, _files(b"abc"))  # saved again (valid: kept), and pruning is still refused
    monkeypatch.setattr(Path, "stat", real_stat)
    ckpt.prune()
    assert sorted(p.name for p in tmp_path.glob("step-*")) == [step_dir_name(s) for s in (10, 30)], "the best stays"
    monkeypatch.setattr(Path, "stat", flaky_stat)
    (tmp_path / step_dir_name(30) / COMPLETE).unlink()  # damaged: the next one down cannot be examined
    with pytest.raises(CheckpointUnreadable, match="nothing was set aside"):
        ckpt.choose()
    assert (tmp_path / step_dir_name(10)).is_dir()


def test_a_universal_conversion_goes_with_its_checkpoint(tmp_path: Path) -> None:
    universal = tmp_path / "universal"
    ckpt = Checkpointer(tmp_path / "ckpt", keep_last=1, rank=0, world=1, barrier=lambda: None, derived=[universal])
    ckpt.save(10, _files(b"abc"))
    (universal / step_dir_name(10)).mkdir(parents=True)
    (universal / step_dir_name(10) / COMPLETE).write_text("ok")
    (universal / "step-0000000003").mkdir()  # converted from a checkpoint that is long gone
    ckpt.save(20, _files(b"abc"))
    assert list(universal.iterdir()) == []
    (universal / step_dir_name(20)).mkdir()
    ckpt.set_aside(tmp_path / "ckpt" / step_dir_name(20), ["test"])
    assert list(universal.iterdir()) == [], "a conversion of a bad checkpoint is bad too"


def test_the_best_checkpoint_is_content_checked_before_its_weights_are_exported(tmp_path: Path) -> None:
    ckpt = _ckpt(tmp_path, keep_last=1)
    for step, metric in ((10, 1.0), (20, 2.0), (30, 3.0)):
        ckpt.save(step, _files(b"weights" * 100), metric=metric)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == [step_dir_name(10), step_dir_name(30)]
    data = bytearray((tmp_path / step_dir_name(10) / "model.bin").read_bytes())
    data[7] ^= 0x80
    (tmp_path / step_dir_name(10) / "model.bin").write_bytes(bytes(data))
    assert ckpt.best() == tmp_path / step_dir_name(10), "by its sizes it looks fine"
    with pytest.warns(CheckpointWarning, match="step-0000000010 is damaged .model.bin: content hash"):
        assert ckpt.best_checked() == tmp_path / step_dir_name(30)
    assert (tmp_path / "step-0000000010.bad").is_dir()
