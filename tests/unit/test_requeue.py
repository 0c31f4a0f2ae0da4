from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from types import FrameType

import pytest

from slurm.requeue import REQUEUE_GRACE_S, RequeueWitness, requeue_signal
from slurm.resources import Resources


def test_the_witness_records_the_signal_and_passes_it_on() -> None:
    handled: list[int] = []

    def submitits(signum: int, frame: FrameType | None) -> None:
        handled.append(signum)

    old = signal.signal(signal.SIGUSR2, submitits)
    try:
        witness = RequeueWitness(signal.SIGUSR2).install()
        assert witness.seen_at is None
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.01)  # Python runs the handler between bytecodes of the main thread
        assert witness.seen_at is not None and handled == [signal.SIGUSR2]
        witness.uninstall()
        assert signal.getsignal(signal.SIGUSR2) is submitits
        witness.uninstall()  # twice is harmless
        assert signal.getsignal(signal.SIGUSR2) is submitits
    finally:
        signal.signal(signal.SIGUSR2, old)


def test_without_a_previous_handler_the_signal_keeps_its_default_action() -> None:
    # The default action of USR2 is to end the process: the witness must not swallow it.
    code = ("import os, signal, time\n"
            "from slurm.requeue import RequeueWitness\n"
            "RequeueWitness(signal.SIGUSR2).install()\n"
            "os.kill(os.getpid(), signal.SIGUSR2)\n"
            "time.sleep(5)\n"
            "print('survived')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGUSR2 and "survived" not in done.stdout, done


def test_only_a_non_zero_rank_that_saw_the_signal_waits_for_the_requeue(capsys: pytest.CaptureFixture[str]) -> None:
    waited: list[float] = []
    old = signal.signal(signal.SIGUSR2, lambda signum, frame: None)
    try:
        witness = RequeueWitness(signal.SIGUSR2, sleep=waited.append).install()
        witness.wait_if_requeued(1, RuntimeError("connection closed by peer"))
        assert waited == []  # no signal: the error is the task's own
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.01)
        witness.wait_if_requeued(0, RuntimeError("scontrol requeue failed"))
        assert waited == []  # rank 0 is the one requeueing: its errors stand
        witness.wait_if_requeued(1, RuntimeError("connection closed by peer"))
        assert waited == [REQUEUE_GRACE_S]
        out = capsys.readouterr().out
        assert "RuntimeError on rank 1 after SIGUSR2" in out and "the job was not requeued" in out
        witness.uninstall()
    finally:
        signal.signal(signal.SIGUSR2, old)


def test_the_requeue_signal_is_the_one_submitit_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    assert requeue_signal() == signal.SIGUSR2
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "USR1")
    assert requeue_signal() == signal.SIGUSR1
    assert Resources(signal="SIGUSR1").signal_number == signal.SIGUSR1


def test_signal_numbers_are_refused_since_submitit_looks_names_up() -> None:
    with pytest.raises(ValueError, match="signal name"):
        Resources(signal="12")


def test_tasks_start_with_the_stop_signal_ignored_until_a_handler_is_installed() -> None:
    # The interpreter command the batch script runs: a signal that reaches the task before Python has a
    # handler must not kill it (USR2's default action), and Python must still be able to install one.
    from slurm.executor import SlurmExecutor

    python = SlurmExecutor(python=sys.executable)._python(Resources(signal="USR2"))
    code = ("import os, signal, time\n"
            "os.kill(os.getpid(), signal.SIGUSR2)\n"
            "time.sleep(0.1)\n"
            "seen = []\n"
            "signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(signum))\n"
            "os.kill(os.getpid(), signal.SIGUSR2)\n"
            "time.sleep(0.1)\n"
            "print('alive, handled', seen)\n")
    done = subprocess.run(["bash", "-c", f"{python} -c {shlex.quote(code)}"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and f"alive, handled [{int(signal.SIGUSR2)}]" in done.stdout, done


def test_after_the_work_is_done_the_signal_is_ignored_at_exit_too() -> None:
    # A job finishing within its signal lead time is signalled while it exits: that must not kill it.
    code = ("import os, signal, atexit, time\n"
            "from slurm.requeue import RequeueWitness\n"
            "signal.signal(signal.SIGUSR2, lambda signum, frame: print('requeue!', flush=True))\n"
            "witness = RequeueWitness(signal.SIGUSR2).install()\n"
            "witness.ignore_from_now()\n"
            "os.kill(os.getpid(), signal.SIGUSR2)\n"
            "time.sleep(0.1)\n"
            "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGUSR2), time.sleep(0.1), print('exiting')))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "requeue!" not in done.stdout and "exiting" in done.stdout, done
