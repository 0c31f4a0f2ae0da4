from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from common import publish
from common.checksum import xxh3_bytes
from common.publish import (
    COMPLETE,
    fsync_tree,
    publish_bytes,
    publish_json,
    publishing,
    publishing_dir,
    publishing_path,
    remove_stale_temps,
    temp_path,
)


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class _Boom(Exception):
    pass


def test_a_published_file_appears_whole_and_its_temp_is_gone(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    with publishing(target) as f:
        f.write(b"new ")
        assert target.read_bytes() == b"old"  # nothing is visible before the block ends
        assert _names(tmp_path) == sorted([temp_path(target).name, "state.json"])
        f.write(b"content")
    assert target.read_bytes() == b"new content"
    assert _names(tmp_path) == ["state.json"]


def test_publish_bytes_and_json(tmp_path: Path) -> None:
    publish_bytes(tmp_path / "a.bin", b"\x00\x01")
    publish_json(tmp_path / "b.json", {"z": 1, "a": [1, 2]})
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    # The format the old write_json_atomic wrote, byte for byte: readers and hashes depend on it.
    assert (tmp_path / "b.json").read_text() == json.dumps({"z": 1, "a": [1, 2]}, indent=1, sort_keys=True) + "\n"
    assert _names(tmp_path) == ["a.bin", "b.json"]


def test_an_error_while_publishing_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    with pytest.raises(_Boom), publishing(target) as f:
        f.write(b"half of the new")
        raise _Boom
    assert target.read_bytes() == b"old"
    assert _names(tmp_path) == ["state.json"]


def test_publishing_path_hands_out_a_name_for_writers_that_open_by_name(tmp_path: Path) -> None:
    target = tmp_path / "work.arrow"
    with publishing_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_bytes(b"data")
    assert target.read_bytes() == b"data" and _names(tmp_path) == ["work.arrow"]
    with pytest.raises(_Boom), publishing_path(target) as tmp:
        tmp.write_bytes(b"other")
        raise _Boom
    assert target.read_bytes() == b"data" and _names(tmp_path) == ["work.arrow"]


def test_temp_names_differ_across_hosts_and_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "LATEST"
    monkeypatch.setattr(socket, "gethostname", lambda: "node-a")
    on_a = temp_path(target)
    monkeypatch.setattr(socket, "gethostname", lambda: "node-b")
    on_b = temp_path(target)
    assert on_a != on_b and on_a.parent == on_b.parent == tmp_path
    assert on_a.name.startswith(".LATEST.tmp") and "node-a" in on_a.name and "node-b" in on_b.name
    monkeypatch.setattr(os, "getpid", lambda: 1)
    first = temp_path(target)
    monkeypatch.setattr(os, "getpid", lambda: 2)
    assert temp_path(target) != first


def test_fsync_tree_reports_every_file_with_its_size(tmp_path: Path) -> None:
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "a.bin").write_bytes(b"abc")
    (tmp_path / "sub" / "b.bin").write_bytes(b"")
    (tmp_path / "sub" / "deeper" / "c.bin").write_bytes(b"12345")
    assert fsync_tree(tmp_path) == {"a.bin": 3, "sub/b.bin": 0, "sub/deeper/c.bin": 5}


def _record_os_calls(monkeypatch: pytest.MonkeyPatch, events: list[tuple[str, ...]]) -> None:
    """Record fsync, replace and rename as they reach the OS, and what the folder holds at each rename."""
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str | Path, dst: str | Path) -> None:
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    def rename(src: str | Path, dst: str | Path) -> None:
        contents = sorted(str(p.relative_to(src)) for p in Path(src).rglob("*")) if Path(src).is_dir() else []
        events.append(("rename", str(src), str(dst), *contents))
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", rename)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name fsynced descriptors")
def test_a_published_folder_gets_its_marker_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "export"
    events: list[tuple[str, ...]] = []
    _record_os_calls(monkeypatch, events)
    with publishing_dir(out) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "weights.bin").write_bytes(b"w" * 100)
        (tmp / "sub" / "tokenizer.json").write_bytes(b"{}")
        assert not out.exists()
    monkeypatch.undo()
    assert _tree(out) == {COMPLETE: b"ok\n", "sub/tokenizer.json": b"{}", "weights.bin": b"w" * 100}
    assert _names(tmp_path) == ["export"]  # no temp folder, no temp marker

    marker = next(i for i, e in enumerate(events) if e[0] == "replace" and Path(e[2]).name == COMPLETE)
    folder = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(out))
    synced = [Path(e[1]).name for e in events[:marker] if e[0] == "fsync"]
    assert "weights.bin" in synced and "tokenizer.json" in synced  # data on disk before the marker exists
    assert marker < folder  # the marker is inside before the folder gets its name
    assert sorted(events[folder][3:]) == [COMPLETE, "sub", "sub/tokenizer.json", "weights.bin"]
    assert any(e == ("fsync", str(tmp_path)) for e in events[folder:])  # and the rename itself is made durable


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name fsynced descriptors")
def test_a_listing_marker_names_every_file_with_its_size_and_xxh3_hashed_after_the_fsync(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "export"
    events: list[tuple[str, ...]] = []
    _record_os_calls(monkeypatch, events)
    real_xxh3 = publish.xxh3_file

    def xxh3_file(path: Path) -> str:
        events.append(("xxh3", str(path)))
        return real_xxh3(path)

    monkeypatch.setattr(publish, "xxh3_file", xxh3_file)
    with publishing_dir(out, marker_data={"source": "step-7"}, listing=True) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "weights.bin").write_bytes(b"w" * 100)
        (tmp / "sub" / "tokenizer.json").write_bytes(b"{}")
    monkeypatch.undo()
    assert json.loads((out / COMPLETE).read_text()) == {"version": 1, "source": "step-7", "files": {
        "sub/tokenizer.json": {"bytes": 2, "xxh3": xxh3_bytes(b"{}")},
        "weights.bin": {"bytes": 100, "xxh3": xxh3_bytes(b"w" * 100)}}}
    order = [(e[0], Path(e[1]).name) for e in events if e[0] in ("fsync", "xxh3")]
    for name in ("weights.bin", "tokenizer.json"):  # hashed what is on disk, not what a cache still held
        assert order.index(("fsync", name)) < order.index(("xxh3", name))
    marker = next(i for i, e in enumerate(events) if e[0] == "replace" and Path(e[2]).name == COMPLETE)
    assert all(i < marker for i, e in enumerate(events) if e[0] == "xxh3")
    with pytest.raises(ValueError, match=r"listing=True\) needs a marker"), \
            publishing_dir(tmp_path / "bytes", marker_data=b"ok", listing=True):
        pass


def test_the_marker_holds_the_data_given(tmp_path: Path) -> None:
    with publishing_dir(tmp_path / "json", marker_data={"b": 1, "a": 2}):
        pass
    assert (tmp_path / "json" / COMPLETE).read_text() == '{\n "a": 2,\n "b": 1\n}\n'
    with publishing_dir(tmp_path / "bytes", marker="DONE", marker_data=b"exactly this"):
        pass
    assert _names(tmp_path / "bytes") == ["DONE"] and (tmp_path / "bytes" / "DONE").read_bytes() == b"exactly this"
    with publishing_dir(tmp_path / "none", marker=None) as tmp:
        (tmp / "a").write_bytes(b"1")
    assert _names(tmp_path / "none") == ["a"]


def test_a_published_folder_replaces_an_older_one(tmp_path: Path) -> None:
    out = tmp_path / "export"
    out.mkdir()
    (out / "stale.bin").write_bytes(b"old")
    (out / COMPLETE).write_bytes(b"ok\n")
    with publishing_dir(out) as tmp:
        (tmp / "weights.bin").write_bytes(b"new")
    assert _tree(out) == {COMPLETE: b"ok\n", "weights.bin": b"new"}
    assert _names(tmp_path) == ["export"]  # the older folder, moved aside, is gone too


def test_an_error_while_filling_a_folder_leaves_the_old_one(tmp_path: Path) -> None:
    out = tmp_path / "export"
    out.mkdir()
    (out / "weights.bin").write_bytes(b"old")
    with pytest.raises(_Boom), publishing_dir(out) as tmp:
        (tmp / "weights.bin").write_bytes(b"half")
        raise _Boom
    assert _tree(out) == {"weights.bin": b"old"}
    assert _names(tmp_path) == ["export"]


def test_a_failed_rename_puts_the_old_folder_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "export"
    out.mkdir()
    (out / "weights.bin").write_bytes(b"old")
    real_rename = os.rename

    def rename(src: str | Path, dst: str | Path) -> None:
        if Path(dst) == out and Path(src).name.startswith(".export.tmp."):  # the new folder, not the old one back
            raise OSError("disk quota exceeded")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="quota"), publishing_dir(out) as tmp:
        (tmp / "weights.bin").write_bytes(b"new")
    monkeypatch.undo()
    assert _tree(out) == {"weights.bin": b"old"}
    assert _names(tmp_path) == ["export"]


def test_a_folder_that_must_not_be_replaced_is_left_alone(tmp_path: Path) -> None:
    out = tmp_path / "student"
    out.mkdir()
    (out / "model.bin").write_bytes(b"someone else's")
    with pytest.raises(FileExistsError, match="already exists"), publishing_dir(out, replace=False) as tmp:
        (tmp / "model.bin").write_bytes(b"mine")
    assert _tree(out) == {"model.bin": b"someone else's"}
    assert _names(tmp_path) == ["student"]
    with publishing_dir(tmp_path / "fresh", marker=None, replace=False) as tmp:
        (tmp / "model.bin").write_bytes(b"mine")
    assert _tree(tmp_path / "fresh") == {"model.bin": b"mine"}


def test_what_killed_writers_left_is_removed_before_a_folder_is_published(tmp_path: Path) -> None:
    """A killed export on another node leaves `.export.tmp.<host>.<pid>`: the next publication removes it, and
    leaves other names' temps alone."""
    for leftover in (".export.tmp.node7.4242", ".export.old.node7.4242"):
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / "model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / ".other.tmp.node7.4242").write_bytes(b"not ours")
    with publishing_dir(tmp_path / "export") as tmp:
        (tmp / "config.json").write_text("{}")
    assert _names(tmp_path) == [".other.tmp.node7.4242", "export"]


def test_remove_stale_temps_of_every_name_in_a_folder_with_one_writer(tmp_path: Path) -> None:
    (tmp_path / ".train-00000.arrow.tmp.node1.77").write_bytes(b"half a shard")
    (tmp_path / ".manifest.json.tmp.node2.78").write_bytes(b"{")
    (tmp_path / "train-00001.arrow").write_bytes(b"whole")
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / ".00000.tokens.arrow.tmp.node1.77").write_bytes(b"a map task's, one level down")
    assert remove_stale_temps(tmp_path) == 2
    assert _names(tmp_path) == ["train-00001.arrow", "work"]
    assert _names(tmp_path / "work") == [".00000.tokens.arrow.tmp.node1.77"]
