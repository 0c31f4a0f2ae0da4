"""Graceful stop requests: a signal from Slurm or a running-out time budget, agreed on by all ranks.

Slurm sends `--signal=USR2@lead` before the time limit or on preemption, to every task but not at the
same moment relative to their training steps. A rank that stopped on its own would leave the others
hanging in the next collective, so ranks ask `StopRequest.agree` at each step boundary: one all-reduce,
after which all of them stop at the same step, save the stop-checkpoint together, and leave.

Leaving:
- Under submitit (Slurm, or the local executor of the embedded default), its own USR2 handler (replaced by
  `install`, restored by `uninstall`) is what calls the Checkpointable's checkpoint() and requeues. After
  the stop-checkpoint, uninstall and send the recorded signal to this process again
  (`os.kill(os.getpid(), stop.received_signal)`): submitit then requeues from rank 0 and exits, and the
  requeued task resumes from `Checkpointer.latest_valid()`.
- On SIGTERM (scancel, `scontrol requeue`, a preemption) Slurm is ending the job itself: exit with
  REQUEUE_EXIT_CODE at once.
- Anywhere else (plain srun, torchrun, a process started by hand), every rank exits with
  REQUEUE_EXIT_CODE after the stop-checkpoint: "stopped cleanly, run me again". Nothing in stillroom
  requeues such a process; whoever started it resumes it by starting it again. Any other non-zero status
  is a real failure.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterable
from types import FrameType, TracebackType
from typing import Any

# EX_TEMPFAIL from sysexits.h ("temporary failure, retry later"): not used by Python, the shell (126,
# 127, 128+N for signals) or timeout(1) (124), so it cannot be mistaken for a crash.
REQUEUE_EXIT_CODE = 75

# Codes for the all-reduce: MAX picks the most urgent reason; 0 means nobody wants to stop.
_NONE = 0
_DEADLINE = 1
_SIGNAL_BASE = 100  # 100 + signal number


def _describe(code: int) -> str:
    if code >= _SIGNAL_BASE:
        return f"signal {signal.Signals(code - _SIGNAL_BASE).name}"
    return "time budget"


class StopRequest:
    """Whether this process (`local`) or any rank (`agree`) wants training to stop at the next step boundary.

    `install` must run in the main thread (Python delivers signals only there). The handlers only record
    the signal; acting on it happens at a step boundary, never inside a collective or a checkpoint write.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock  # wall clock: Slurm's end time is a unix time
        self._signal: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}
        self._end_time: float | None = None
        self._margin_s = 0.0

    @property
    def received_signal(self) -> signal.Signals | None:
        """The first stop signal received, if any."""
        return self._signal

    def install(self, signals: Iterable[int] = (signal.SIGUSR2, signal.SIGTERM)) -> StopRequest:
        if self._previous:
            raise RuntimeError("StopRequest is already installed; uninstall it first")
        for sig in map(signal.Signals, signals):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Put back the handlers `install` replaced."""
        for sig, previous in self._previous.items():
            # None: the previous handler was set outside Python and cannot be put back; default is closest.
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    def __enter__(self) -> StopRequest:
        if not self._previous:
            self.install()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.uninstall()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._signal is None:
            self._signal = signal.Signals(signum)

    def set_deadline(self, end_time: float | None, margin_s: float) -> None:
        """Ask to stop once fewer than `margin_s` seconds are left before `end_time` (None: no budget).

        The margin must cover the longest step, the stop-checkpoint and shutdown.
        """
        self._end_time = end_time
        self._margin_s = margin_s

    def _local(self) -> tuple[int, str | None]:
        if self._signal is not None:
            return _SIGNAL_BASE + self._signal.value, f"signal {self._signal.name}"
        if self._end_time is not None:
            left = self._end_time - self._clock()
            if left < self._margin_s:
                return _DEADLINE, f"time budget: {left:.0f} s left < margin {self._margin_s:.0f} s"
        return _NONE, None

    def local(self) -> str | None:
        """Why this process wants to stop, or None."""
        return self._local()[1]

    def agree(self, device: Any = "cpu") -> str | None:
        """Whether any rank wants to stop, the same answer on every rank: call it on all ranks at a step boundary.

        One all-reduce (MAX) of a 1-element tensor on `device`: "cpu" with gloo, the rank's GPU with NCCL.
        Ranks that did not ask themselves get the reason with "(another rank)" appended.
        """
        code, reason = self._local()
        import torch.distributed as dist  # here, so that signals and deadlines work without importing torch

        if not (dist.is_available() and dist.is_initialized()):
            return reason
        import torch

        flag = torch.tensor([code], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        agreed = int(flag.item())
        if agreed == _NONE:
            return None
        return reason if agreed == code else f"{_describe(agreed)} (another rank)"
