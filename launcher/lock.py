"""Locks on a run directory that hold across the nodes of a cluster, whatever its shared filesystem.

`flock` is the cheap answer and is cluster-wide on local disks, GPFS, NFSv4 and Lustre mounted with
`flock`. It is missing (ENOSYS) on Lustre mounted without `flock`, and it is only per node on Lustre's
`localflock`, NFS mounted `nolock` or `local_lock=flock|all`, and BeeGFS's default (no global locks): two
nodes would both "hold" it and one node's update of state.json would be lost. There a lock is a file made
by an atomic hard link (atomic on every POSIX filesystem, NFS included, unlike O_EXCL on old NFS) that
records its holder (host, pid, job), with stale-holder detection.

Which kind a run directory uses is decided once, when it is created (`probe_lock_kind`), and recorded in
the run directory (`RunLayout.lock_kind`), so every process of the run, on every node, locks the same way.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

# Filesystems whose flock is per node at best, unless a mount option says otherwise (see _mount_lock_kind).
_NODE_LOCAL_FLOCK = {"beegfs", "fuse.beegfs"}


class LockTimeout(RuntimeError):
    """The lock stayed held by someone else; the message names the holder and what to do."""


def _mount_of(path: Path) -> tuple[str, set[str]]:
    """(filesystem type, mount options) of the mount that holds `path`, from /proc/mounts ("", set() if unknown)."""
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return "", set()
    target, best = str(path.resolve()), ("", "", "")
    for line in lines:
        parts = line.split()
        if len(parts) < 4:
            continue
        mountpoint = parts[1].replace("\\040", " ")
        inside = target == mountpoint or target.startswith(mountpoint.rstrip("/") + "/")
        if inside and len(mountpoint) >= len(best[0]):
            best = (mountpoint, parts[2], parts[3])
    return best[1], set(best[2].split(",")) if best[2] else set()


def _mount_lock_kind(fstype: str, options: set[str]) -> str | None:
    """"file" where the mount's flock is known not to be cluster-wide; None where it should be."""
    if fstype in _NODE_LOCAL_FLOCK:
        return "file"
    if fstype == "lustre":
        return None if "flock" in options else "file"  # localflock and the default (none) are not global
    node_local_nfs = {"nolock", "local_lock=flock", "local_lock=all"}
    if fstype.startswith("nfs") and options & node_local_nfs:
        return "file"
    return None


def probe_lock_kind(folder: Path, flock: Callable[[int, int], None] | None = None) -> str:
    """"flock" if a flock on `folder`'s filesystem works and is cluster-wide, else "file"."""
    flock = flock or fcntl.flock
    if _mount_lock_kind(*_mount_of(folder)) == "file":
        return "file"
    probe = folder / f".lock-probe.{socket.gethostname()}.{os.getpid()}"
    try:
        with probe.open("a") as f:
            flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            flock(f.fileno(), fcntl.LOCK_UN)
    except OSError as e:
        if e.errno in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL):
            return "file"
        raise
    finally:
        probe.unlink(missing_ok=True)
    return "flock"


def _holder_text() -> str:
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "job": os.environ.get("SLURM_JOB_ID", ""),
                       "since": time.time()})


def _alive_here(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive lock at `path`, of `kind` "flock" or "file"; use as `with RunLock(...).held(): ...`.

    stale_after_s: a "file" lock whose holder is on another host (its pid cannot be checked from here) and that
                   is older than this is taken over; one on this host is taken over as soon as its pid is gone.
                   Locks are held for seconds (one state update, one round of sbatch calls), so the default
                   leaves a wide margin.
    """

    def __init__(self, path: Path, kind: str, *, timeout_s: float = 600.0, stale_after_s: float = 900.0,
                 poll_s: float = 0.05) -> None:
        if kind not in ("flock", "file"):
            raise ValueError(f"lock kind must be 'flock' or 'file', got {kind!r}")
        self.path, self.kind, self.poll_s = path, kind, poll_s
        self.timeout_s, self.stale_after_s = timeout_s, stale_after_s

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        if self.kind == "flock":
            with self.path.open("a") as f:
                self._wait(lambda: self._try_flock(f.fileno()))
                try:
                    yield
                finally:
                    fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            return
        self._wait(self._try_file)
        try:
            yield
        finally:
            self.path.unlink(missing_ok=True)

    def _wait(self, attempt: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not attempt():
            if time.monotonic() > deadline:
                raise LockTimeout(f"{self.path} is still held after {self.timeout_s:.0f} s by {self.holder()}; if "
                                  f"that process is gone, remove {self.path} and try again")
            time.sleep(self.poll_s)

    def _try_flock(self, fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _try_file(self) -> bool:
        """Create the lock by hard-linking a private file to its name: the link fails if it exists."""
        mine = self.path.with_name(f"{self.path.name}.{socket.gethostname()}.{os.getpid()}")
        mine.write_text(_holder_text())
        try:
            os.link(mine, self.path)
            return True
        except FileExistsError:
            self._take_over_if_stale()
            return False
        finally:
            mine.unlink(missing_ok=True)

    def holder(self) -> str:
        try:
            info = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return "an unknown holder"
        job = f", job {info['job']}" if info.get("job") else ""
        return f"host {info.get('host')} pid {info.get('pid')}{job}"

    def _take_over_if_stale(self) -> None:
        try:
            judged = self.path.stat().st_ino
            info = json.loads(self.path.read_text())
            age = time.time() - float(info["since"])
            here = info["host"] == socket.gethostname()
            stale = (here and not _alive_here(int(info["pid"]))) or (not here and age > self.stale_after_s)
        except FileNotFoundError:
            return  # released meanwhile: the next attempt takes it
        except (OSError, ValueError, KeyError, TypeError):
            return  # not a lock this code wrote (links are made from complete files): leave it to its owner
        if not stale:
            return
        # Rename, not unlink: of several processes taking over at once only one rename succeeds. Should the lock
        # have been released and taken afresh between our look and the rename, we moved a live lock: put it back.
        aside = self.path.with_name(f"{self.path.name}.stale.{socket.gethostname()}.{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if aside.stat().st_ino != judged:
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
        aside.unlink(missing_ok=True)
