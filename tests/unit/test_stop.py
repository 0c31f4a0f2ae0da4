from __future__ import annotations

import json
import os
import signal
import time
from datetime import timedelta
from pathlib import Path
from types import FrameType

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import free_port
from training.stop import REQUEUE_EXIT_CODE, StopRequest


def test_a_signal_only_sets_the_flag() -> None:
    with StopRequest() as stop:
        assert stop.local() is None and stop.agree() is None
        os.kill(os.getpid(), signal.SIGUSR2)  # SIGUSR2's default action would kill pytest
        time.sleep(0.01)  # Python runs the handler between bytecodes of the main thread; give it one
        assert stop.received_signal == signal.SIGUSR2
        assert stop.local() == "signal SIGUSR2"
        assert stop.agree() == "signal SIGUSR2"  # without torch.distributed: the local answer
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop.local() == "signal SIGUSR2"  # the first signal is the one reported


def test_uninstall_restores_the_previous_handlers() -> None:
    def previous(signum: int, frame: FrameType | None) -> None:
        pass

    before_term = signal.getsignal(signal.SIGTERM)
    old_usr2 = signal.signal(signal.SIGUSR2, previous)
    try:
        stop = StopRequest().install()
        assert signal.getsignal(signal.SIGUSR2) not in (previous, signal.SIG_DFL)
        with pytest.raises(RuntimeError, match="already installed"):
            stop.install()
        stop.uninstall()
        assert signal.getsignal(signal.SIGUSR2) is previous and signal.getsignal(signal.SIGTERM) == before_term
        with StopRequest().install(signals=[signal.SIGUSR1]):
            assert signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.default_int_handler)
            assert signal.getsignal(signal.SIGUSR2) is previous  # only what was asked for
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
        stop.uninstall()  # a second uninstall does nothing
    finally:
        signal.signal(signal.SIGUSR2, old_usr2)


def test_deadline() -> None:
    now = [1000.0]
    stop = StopRequest(clock=lambda: now[0])
    assert stop.local() is None
    stop.set_deadline(1300.0, margin_s=120)
    assert stop.local() is None
    now[0] = 1180.0  # exactly the margin left: not yet
    assert stop.local() is None
    now[0] = 1205.0
    assert stop.local() == "time budget: 95 s left < margin 120 s"
    now[0] = 1400.0
    assert stop.local() == "time budget: -100 s left < margin 120 s"
    stop.set_deadline(None, margin_s=120)  # no known end time: no budget
    assert stop.local() is None


def test_requeue_exit_code_is_not_a_crash_code() -> None:
    assert REQUEUE_EXIT_CODE not in (0, 1, 2, 124, 126, 127) and REQUEUE_EXIT_CODE < 128


def _two_ranks(rank: int, port: int, out: Path) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    answers: list[str | None] = []
    try:
        with StopRequest() as stop:
            answers.append(stop.agree("cpu"))  # nobody asks
            if rank == 1:
                stop.set_deadline(time.time() - 5, margin_s=60)
            answers.append(stop.agree("cpu"))
            if rank == 1:
                os.kill(os.getpid(), signal.SIGUSR2)
                time.sleep(0.01)
            answers.append(stop.agree("cpu"))  # a signal outranks the time budget
    finally:
        dist.destroy_process_group()
    (out / f"rank{rank}.json").write_text(json.dumps(answers))


@pytest.mark.timeout(60)
def test_all_ranks_agree_when_one_wants_to_stop(tmp_path: Path) -> None:
    mp.spawn(_two_ranks, args=(free_port(), tmp_path), nprocs=2, join=True)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank0 == [None, "time budget (another rank)", "signal SIGUSR2 (another rank)"]
    assert rank1[0] is None and rank1[1].startswith("time budget: -5 s left < margin 60 s")
    assert rank1[2] == "signal SIGUSR2"
