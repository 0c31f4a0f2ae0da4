"""DeepSpeed's side of our checkpoints: what a rank writes into one and returns to `Checkpointer.save`, loading one
(with failures reported instead of half-raised), and the universal conversion for a resume on another rank count.
The protocol itself (hashes, COMPLETE, set-aside, pruning) is `training/checkpoint.py`'s.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch.distributed as dist

from common.publish import COMPLETE, publish_bytes, publish_json, publishing_dir
from training.config import TrainConfig
from training.rng import capture_rng, rng_file
from training.train_state import TrainState

TRAIN_STATE = "train_state.json"  # inside each checkpoint, written by rank 0
HEARTBEAT_S = 10.0  # how often rank 0 shows it is still converting
HEARTBEAT_DEAD_S = 180.0  # the other ranks give up when rank 0 has not shown life for this long


class RecordingCheckpointEngine:
    """Wraps DeepSpeed's checkpoint engine to learn which files this rank's `save_checkpoint` wrote: DeepSpeed
    saves every state file through `checkpoint_engine.save(state_dict, path)`, and this rank must fsync and hash
    exactly its own files. Everything else is the wrapped engine's. Files DeepSpeed writes another way are hashed
    by rank 0 (`Checkpointer._publish`), so a DeepSpeed that changes this costs durability on other nodes' files,
    not correctness."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.written: list[Path] = []

    def save(self, state_dict: Any, path: str) -> Any:
        result = self._inner.save(state_dict, path)
        self.written.append(Path(path))
        return result

    def __getattr__(self, name: str) -> Any:  # only called for what this class does not define
        return getattr(self._inner, name)


def record_checkpoint_files(engine: Any) -> None:
    """Install the recorder on a DeepSpeed engine (once)."""
    inner = getattr(engine, "checkpoint_engine", None)
    if inner is not None and not isinstance(inner, RecordingCheckpointEngine):
        engine.checkpoint_engine = RecordingCheckpointEngine(inner)


def write_checkpoint(engine: Any, state: TrainState, rank: int, folder: Path) -> list[Path]:
    """What this rank puts into the checkpoint folder `Checkpointer.save` hands it; returns the files it wrote."""
    recorder = getattr(engine, "checkpoint_engine", None)
    if isinstance(recorder, RecordingCheckpointEngine):
        recorder.written.clear()
    # The (empty) universal info lets ds_to_universal convert it for a resume on another rank count.
    engine.save_checkpoint(str(folder.parent), tag=folder.name, save_latest=False,
                           client_state={"universal_checkpoint_info": {}})
    written = list(recorder.written) if isinstance(recorder, RecordingCheckpointEngine) else []
    publish_json(rng_file(folder, rank), capture_rng())
    written.append(rng_file(folder, rank))
    if rank == 0:
        publish_json(folder / TRAIN_STATE, state.state_dict())
        written.append(folder / TRAIN_STATE)
    return [p for p in written if p.is_relative_to(folder)]


def load_checkpoint(engine: Any, load_from: Path, resumed: Path) -> tuple[TrainState | None, str]:
    """Load weights and optimizer state from `load_from` into the engine and read `resumed`'s TrainState.

    Returns (state, "") or (None, why it failed): the caller gathers every rank's outcome before acting, so
    one rank's failure cannot leave the others in a collective. DeepSpeed answers a checkpoint it cannot find
    with (None, None) rather than an error; that is a failure too.
    """
    try:
        path, _ = engine.load_checkpoint(str(load_from.parent), tag=load_from.name, load_lr_scheduler_states=False)
        if path is None:
            return None, f"DeepSpeed found no loadable checkpoint in {load_from}"
        saved = TrainState()
        saved.load_state_dict(json.loads((resumed / TRAIN_STATE).read_text()))
    except Exception as e:  # noqa: BLE001 (any failure to load sets the checkpoint aside; the message says which)
        return None, f"loading {load_from.name} failed: {type(e).__name__}: {e}"
    return saved, ""


def saved_world(checkpoint: Path) -> int:
    return int(json.loads((checkpoint / COMPLETE).read_text()).get("world_size", 0))


def loadable(cfg: TrainConfig, resumed: Path | None, universal_root: Path, rank: int,
             world: int) -> tuple[TrainConfig, Path | None]:
    """The folder to load `resumed` from, and the config to load it with."""
    if resumed is None or saved_world(resumed) == world or cfg.engine.zero_stage == 0:
        return cfg, resumed
    # ZeRO shards optimizer state by rank; another rank count needs DeepSpeed's universal format.
    overrides = {**cfg.engine.overrides, "checkpoint.load_universal": "true"}
    return replace(cfg, engine=replace(cfg.engine, overrides=overrides)), universal(resumed, universal_root, rank)


@contextmanager
def _heartbeat(path: Path) -> Any:
    """Touch `path` every HEARTBEAT_S while the block runs, so that waiting ranks can tell slow from dead."""
    done = threading.Event()

    def beat() -> None:
        while not done.is_set():
            path.touch()
            done.wait(HEARTBEAT_S)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        path.unlink(missing_ok=True)


def universal(checkpoint: Path, root: Path, rank: int) -> Path:
    """The checkpoint in DeepSpeed's universal format, loadable on any rank count: converted once, by rank 0, and
    kept (a requeue reuses it; pruning removes it with its checkpoint).

    The other ranks wait by watching the filesystem, not in a collective: converting a multi-billion-parameter
    checkpoint takes longer than NCCL's collective timeout. They stop waiting when rank 0 records a failure or
    its heartbeat stops. DeepSpeed's converter cannot continue a conversion it did not finish, so an
    interrupted one starts again; only a finished one is reused."""
    target, failed, beating = root / checkpoint.name, root / f"{checkpoint.name}.failed", \
        root / f"{checkpoint.name}.converting"
    if rank == 0 and not (target / COMPLETE).exists():
        root.mkdir(parents=True, exist_ok=True)
        failed.unlink(missing_ok=True)
        beating.touch()
    if dist.is_initialized():
        dist.barrier()  # a failure marker of an earlier attempt is gone before anyone looks for one
    if rank == 0 and not (target / COMPLETE).exists():
        with _heartbeat(beating):  # the failure marker is written before the heartbeat stops
            try:
                with publishing_dir(target) as tmp:
                    _convert(checkpoint, tmp)
            except BaseException as e:
                publish_bytes(failed, f"{type(e).__name__}: {e}\n".encode())
                raise
    while not (target / COMPLETE).exists():
        if failed.exists():
            raise RuntimeError(f"rank 0 could not convert {checkpoint} to the universal format: "
                               f"{failed.read_text().strip()}")
        try:
            idle = time.time() - beating.stat().st_mtime
        except FileNotFoundError:
            idle = 0.0 if (target / COMPLETE).exists() else HEARTBEAT_DEAD_S + 1
        if idle > HEARTBEAT_DEAD_S:
            raise RuntimeError(f"rank 0 stopped converting {checkpoint} to the universal format "
                               f"(no sign of life for {idle:.0f} s)")
        time.sleep(1.0)
    return target


def _convert(checkpoint: Path, out: Path) -> None:
    from deepspeed.checkpoint.ds_to_universal import main as to_universal
    from deepspeed.checkpoint.ds_to_universal import parse_arguments

    saved_argv = sys.argv
    try:
        sys.argv = ["ds_to_universal", "--input_folder", str(checkpoint), "--output_folder", str(out),
                    "--num_extract_workers", "1", "--num_merge_workers", "1"]
        to_universal(parse_arguments())
    finally:
        sys.argv = saved_argv
