"""Run-directory locks: flock where it is cluster-wide, a hard-linked lock file where it is missing or per node."""

from __future__ import annotations

import errno
import fcntl
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.lock import LockTimeout, RunLock, _mount_lock_kind, probe_lock_kind
from launcher.run_config import load_run_config
from launcher.rundir import RunDir


def _no_flock(fd: int, operation: int) -> None:
    """flock as Lustre mounted without `flock` answers it."""
    raise OSError(errno.ENOSYS, "Function not implemented")


@pytest.mark.parametrize(("fstype", "options", "kind"), [
    ("lustre", {"rw", "flock"}, None),
    ("lustre", {"rw", "localflock"}, "file"),
    ("lustre", {"rw"}, "file"),
    ("nfs4", {"rw", "hard"}, None),
    ("nfs", {"rw", "nolock"}, "file"),
    ("nfs4", {"rw", "local_lock=flock"}, "file"),
    ("beegfs", {"rw"}, "file"),
    ("gpfs", {"rw"}, None),
    ("ext4", {"rw"}, None),
])
def test_mounts_whose_flock_is_not_cluster_wide_use_a_lock_file(fstype: str, options: set[str],
                                                                 kind: str | None) -> None:
    assert _mount_lock_kind(fstype, options) == kind


def test_the_probe_falls_back_to_a_lock_file_where_flock_is_missing(tmp_path: Path) -> None:
    assert probe_lock_kind(tmp_path) == "flock"  # this machine's filesystem has a working flock
    assert probe_lock_kind(tmp_path, flock=_no_flock) == "file"
    assert list(tmp_path.iterdir()) == []  # the probe leaves nothing behind


def _hold(path: str, kind: str, log: str, name: str, hold_s: float) -> None:
    with RunLock(Path(path), kind).held():
        with open(log, "a") as f:
            f.write(f"{name} in {time.time():.6f}\n")
        time.sleep(hold_s)
        with open(log, "a") as f:
            f.write(f"{name} out {time.time():.6f}\n")


@pytest.mark.parametrize("kind", ["file", "flock"])
def test_two_lockers_in_two_processes_exclude_each_other(tmp_path: Path, kind: str) -> None:
    log = tmp_path / "log"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_hold, args=(str(tmp_path / ".run.lock"), kind, str(log), name, 0.3))
             for name in ("a", "b", "c")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    events = [line.split() for line in log.read_text().splitlines()]
    assert len(events) == 6
    for i in range(0, 6, 2):  # in, out, in, out, ...: never two holders at once
        assert events[i][0] == events[i + 1][0] and (events[i][1], events[i + 1][1]) == ("in", "out")
    assert not (tmp_path / ".run.lock").exists() or kind == "flock"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _plant(path: Path, host: str, pid: int, age_s: float) -> None:
    path.write_text(json.dumps({"host": host, "pid": pid, "job": "777", "since": time.time() - age_s}))


def test_a_lock_left_by_a_dead_process_on_this_host_is_taken_over(tmp_path: Path) -> None:
    lock = tmp_path / ".run.lock"
    _plant(lock, socket.gethostname(), _dead_pid(), age_s=1)
    began = time.monotonic()
    with RunLock(lock, "file", timeout_s=5).held():
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert time.monotonic() - began < 2 and not lock.exists()


def test_a_live_holder_is_waited_for_and_named_and_an_old_one_elsewhere_is_taken_over(tmp_path: Path) -> None:
    lock = tmp_path / ".run.lock"
    _plant(lock, socket.gethostname(), os.getpid(), age_s=5000)  # alive: however old, it is not stale
    with pytest.raises(LockTimeout, match=r"held after 0 s by host .* pid \d+, job 777; if that process is gone"), \
            RunLock(lock, "file", timeout_s=0.3).held():
        pass
    _plant(lock, "node-that-crashed", 12345, age_s=60)  # another host, recent: it may still be working
    with pytest.raises(LockTimeout), RunLock(lock, "file", timeout_s=0.3, stale_after_s=600).held():
        pass
    _plant(lock, "node-that-crashed", 12345, age_s=3600)  # another host, long past any lock hold: stale
    with RunLock(lock, "file", timeout_s=5, stale_after_s=600).held():
        assert json.loads(lock.read_text())["host"] == socket.gethostname()


def _bump(run_path: str, n: int) -> None:
    run = RunDir(Path(run_path))
    for i in range(n):
        run.update_stage("probe", tasks=10**6, task_done=f"{os.getpid()}-{i}")


def test_state_updates_from_two_processes_are_not_lost_where_flock_is_missing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The BeeGFS / Lustre-without-flock case: the run directory records "file" and every update survives."""
    monkeypatch.setattr(fcntl, "flock", _no_flock)
    run = RunDir.create(load_run_config(None, [f"run.root={tmp_path}", "run.name=locks"]))
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_bump, args=(str(run.path), 25)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(run.read_state()["stages"]["probe"]["tasks_done"]) == 50
    assert (run.path / ".lock-kind").read_text() == "file\n"
