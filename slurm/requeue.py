"""Telling a task that failed because its job is being requeued from one that failed on its own.

Under submitit, the requeue signal (`SUBMITIT_PREEMPT_SIGNAL`, USR2 unless set) reaches every task of a
job. Rank 0's handler checkpoints, runs `scontrol requeue` and exits; the other ranks' handlers do
nothing. Outside the training loop's own stop handling (which agrees on a step boundary with every
rank) that exit is abrupt: a rank waiting for rank 0 in a rendezvous or a collective then fails with
"connection closed by peer". That error is a symptom of the requeue, not a failure of the stage, and
recording it as one would mark the stage failed while its next attempt is already queued.

`RequeueWitness` remembers whether this task saw the requeue signal, and passes the signal on to the
handler that was there before it (submitit's), so requeueing works exactly as without it.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

# How long a rank waits for the requeue rank 0 started to end it. Longer than any sane KillWait (Slurm's
# default is 30 s): a requeue ends the task well before this.
REQUEUE_GRACE_S = 120.0


def requeue_signal() -> signal.Signals:
    """The signal submitit's task-side handler requeues on: the one it reads from SUBMITIT_PREEMPT_SIGNAL."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").removeprefix("SIG")
    return signal.Signals["SIG" + name]


class RequeueWitness:
    """Records the requeue signal's arrival, then lets the previous handler act on it.

    `install` must run in the main thread. The training loop's `StopRequest` replaces this handler while
    it trains and puts it back afterwards, so the witness sees signals outside training.
    """

    def __init__(self, sig: signal.Signals | None = None, sleep: Callable[[float], None] = time.sleep) -> None:
        self.signal = sig or requeue_signal()
        self.seen_at: float | None = None  # time.time() of the first requeue signal, None if none came
        self._sleep = sleep
        self._previous: Any = None
        self._installed = False

    def install(self) -> RequeueWitness:
        self._previous = signal.signal(self.signal, self._handle)
        self._installed = True
        return self

    def uninstall(self) -> None:
        if self._installed:
            signal.signal(self.signal, signal.SIG_DFL if self._previous is None else self._previous)
            self._installed = False

    def ignore_from_now(self) -> None:
        """The task's work is done: ignore the signal until the process ends.

        A job that finishes within its signal lead time is signalled while it exits. Requeueing then would
        rerun finished work, and a process without a handler dies of the signal (Python resets its handlers
        to the default action as it shuts down, but leaves ignored signals ignored), which Slurm records as
        a FAILED job whose afterok dependants never start.
        """
        signal.signal(self.signal, signal.SIG_IGN)
        self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.seen_at is None:
            self.seen_at = time.time()
        previous = self._previous
        if callable(previous):
            previous(signum, frame)
        elif previous in (signal.SIG_DFL, None):
            # What would have happened without us: the default action (terminate) for USR1/USR2/TERM.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def wait_if_requeued(self, rank: int, error: BaseException) -> None:
        """Called with a task's error before it is recorded: if that error may be the requeue's doing, wait.

        Rank 0 performs the requeue, so its own errors always stand. Another rank that saw the signal
        waits up to REQUEUE_GRACE_S for Slurm to end this attempt; if it is still alive afterwards, the job
        was not requeued and the caller records the error as usual.
        """
        if self.seen_at is None or rank == 0:
            return
        print(f"[requeue] {type(error).__name__} on rank {rank} after {self.signal.name} "
              f"({time.time() - self.seen_at:.1f} s ago): rank 0 is requeueing the job, so this error is "
              f"expected; waiting up to {REQUEUE_GRACE_S:.0f} s for Slurm to end this attempt before "
              "recording it as a failure", flush=True)
        self._sleep(REQUEUE_GRACE_S)
        print(f"[requeue] still running {REQUEUE_GRACE_S:.0f} s later: the job was not requeued; "
              "recording the error", flush=True)
