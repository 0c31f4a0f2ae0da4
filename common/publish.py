"""Publishing files and folders: a reader, a requeued task or another node sees the old version or the whole new
one, never part of one.

The protocol is the same everywhere: write under a temporary sibling name, fsync the data, rename over the final
name, fsync the parent folder (the rename is durable only once the directory entry is on disk). A folder is
fsynced file by file and gets its completion marker written last, inside it, before the rename.

Temporary names carry the host and the pid: tasks on several nodes share one filesystem, and pids repeat across
nodes, so a pid alone would let two writers on two nodes truncate each other's temp file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from common.checksum import xxh3_file

COMPLETE = "COMPLETE"  # the default completion marker of a published folder


def temp_path(path: Path) -> Path:
    """A sibling of `path` that no other writer (process or node) uses: `.name.tmp.<host>.<pid>`."""
    return path.with_name(f".{path.name}.tmp.{socket.gethostname()}.{os.getpid()}")


def remove_stale_temps(folder: Path, name: str = "*") -> int:
    """Remove what killed writers left in `folder`: the temp files and folders of `name` (every name by
    default), `.name.tmp.<host>.<pid>` and `.name.old.<host>.<pid>`; returns how many.

    Only where one writer at a time publishes (a stage's single owner: an export, a reduce): the temp of another
    live writer would go too. Temp names are unique per host and process, so without this a requeue on another
    node would leave a killed attempt's temp (a whole model export) on disk for good.
    """
    stale = [*folder.glob(f".{name}.tmp.*"), *folder.glob(f".{name}.old.*")] if folder.is_dir() else []
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return len(stale)


def fsync_path(path: Path) -> int:
    """fsync a file or folder; returns its size as seen through the open descriptor.

    Opening first matters on NFS: close-to-open consistency makes the size fresh even for a file another node
    wrote, where a plain stat() could answer from the attribute cache.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> dict[str, int]:
    """fsync every file and folder under `folder`, children before parents; returns {relative path: size}."""
    sizes: dict[str, int] = {}
    for dirpath, _dirnames, filenames in sorted(os.walk(folder), reverse=True):
        for filename in sorted(filenames):
            path = Path(dirpath) / filename
            sizes[path.relative_to(folder).as_posix()] = fsync_path(path)
        fsync_path(Path(dirpath))
    return dict(sorted(sizes.items()))


def commit_file(tmp: Path, path: Path) -> None:
    """Publish the finished file `tmp` as `path`: fsync, rename over it, fsync the folder."""
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


@contextlib.contextmanager
def publishing_path(path: Path) -> Iterator[Path]:
    """Yields the temp path to write `path` through (for writers that open files by name, e.g. pyarrow); on a
    clean exit it is published, on an error removed and `path` left as it was."""
    tmp = temp_path(path)
    try:
        yield tmp
        commit_file(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def publishing(path: Path) -> Iterator[IO[bytes]]:
    """`with publishing(path) as f: f.write(...)`: the file appears whole at `path` when the block ends."""
    with publishing_path(path) as tmp, tmp.open("wb") as f:
        yield f


def publish_bytes(path: Path, data: bytes) -> None:
    with publishing(path) as f:
        f.write(data)


def publish_json(path: Path, data: Any) -> None:
    publish_bytes(path, _json_bytes(data))


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()


def publish_once(path: Path, data: bytes) -> bool:
    """Publish `data` at `path` unless a file is there already; True when this call wrote it.

    For records the first of several writers decides (tasks on several nodes starting at once): the whole
    file is written and fsynced under this writer's temp name, then hard-linked to `path`, which fails when
    another writer got there first, where a rename would silently replace it. Readers see no file or a
    whole one.
    """
    mine = temp_path(path)
    try:
        with mine.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(mine, path)
        except FileExistsError:
            return False
        fsync_path(path.parent)
        return True
    finally:
        mine.unlink(missing_ok=True)


def publish_json_once(path: Path, data: Any) -> bool:
    return publish_once(path, _json_bytes(data))


@contextlib.contextmanager
def publishing_dir(path: Path, marker: str | None = COMPLETE, marker_data: Any = None, *,
                   replace: bool = True, listing: bool = False) -> Iterator[Path]:
    """Yields an empty temp folder to fill; on a clean exit it becomes `path`, replacing an older one.

    Every file in it is fsynced, then `marker` is written last inside it (`marker_data` verbatim if it is bytes,
    else its JSON, or "ok" when None), then the folder is renamed into place. An older `path` is first moved
    aside, not deleted, so that a kill between the two renames leaves the old folder under a temp name rather
    than half of either; should the second rename fail, the old folder is moved back. On an error the temp
    folder is removed and `path` left as it was. With `replace=False` an existing `path` is never touched: the
    publication fails with FileExistsError instead. One writer at a time publishes a given folder, so what
    killed writers of `path` left beside it is removed first (`remove_stale_temps`).

    With `listing=True` the marker is JSON `{"version": 1, "files": {relative path: {"bytes": n, "xxh3": hex}}}`
    (merged into `marker_data`, a dict or None), computed after the fsync, so that a reader can tell a whole
    folder from a damaged one. It reads every byte once more: right after the write the pages are usually still
    cached and XXH3 runs at memory speed (measured in docs/training.md), so it costs about one read of the folder.
    """
    if listing and not (marker is not None and (marker_data is None or isinstance(marker_data, dict))):
        raise ValueError("publishing_dir(listing=True) needs a marker and marker_data that is a dict or None")
    tmp = temp_path(path)
    remove_stale_temps(path.parent, path.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        yield tmp
        sizes = fsync_tree(tmp)
        if listing:
            files = {rel: {"bytes": size, "xxh3": xxh3_file(tmp / rel)} for rel, size in sizes.items()}
            marker_data = {**(marker_data or {}), "version": 1, "files": files}
        if marker is not None:
            if marker_data is None:
                body = b"ok\n"
            elif isinstance(marker_data, bytes):
                body = marker_data
            else:
                body = (json.dumps(marker_data, indent=1, sort_keys=True) + "\n").encode()
            publish_bytes(tmp / marker, body)
        old = path.with_name(f".{path.name}.old.{socket.gethostname()}.{os.getpid()}")
        moved = False
        if path.exists():
            if not replace:
                raise FileExistsError(f"{path} already exists; not replacing it")
            shutil.rmtree(old, ignore_errors=True)  # from an earlier kill; rename cannot replace a full folder
            os.rename(path, old)
            moved = True
        try:
            os.rename(tmp, path)
        except BaseException:
            if moved:
                os.rename(old, path)
            raise
        fsync_path(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
