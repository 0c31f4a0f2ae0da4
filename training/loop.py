"""The training loop shared by continued pretraining and distillation.

The two differ in the `Objective` (the loss, and for distillation a frozen teacher), not here.
Read `_train` top to bottom: set up, resume, then per optimizer step: LR, micro-batches, log, evaluate,
checkpoint, stop; at the end export. The pieces it calls come first, in the order it calls them.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import torch.distributed as dist

from common.publish import publish_json
from sharding.tokenize import tokenizer_fingerprint
from slurm.requeue import REQUEUE_GRACE_S
from slurm.taskenv import TaskEnv, process_age_s, slurm_job_end_time
from training.checkpoint import Checkpointer, all_gather
from training.config import TrainConfig
from training.data import EvalSet, MixedStream, OpenedSource, check_compatible, open_sources
from training.doc_mask import Feed
from training.ds_checkpoint import load_checkpoint, loadable, record_checkpoint_files, saved_world, write_checkpoint
from training.engine import (
    build_engine,
    deepspeed_config,
    engine_summary,
    for_device,
    load_for_engine,
    model_fingerprint,
    setup_distributed,
)
from training.evaluate import EarlyStopping, evaluate
from training.export import ExportInterrupted, export_model
from training.metrics import MetricsLog
from training.prefetch import Prefetcher
from training.rng import restore_rng, rng_file
from training.schedule import lr_at
from training.stop import REQUEUE_EXIT_CODE, StopRequest
from training.train_state import TrainState


@dataclass(frozen=True)
class TrainPaths:
    """Where a training stage writes: its folder, and the files in it that others read (the launcher's run
    layout names them; this module never computes a path outside `folder`)."""

    folder: Path  # the stage's folder: deepspeed.json, universal/ (resume on another rank count)
    checkpoints: Path  # step-N/ checkpoints
    export: Path  # the Hugging Face export, COMPLETE inside once whole
    metrics: Path  # metrics.jsonl, every event
    progress: Path  # progress.json, the latest numbers for `stillroom status`


@dataclass(frozen=True)
class Objective:
    name: str  # "cpt" or "distill"
    # (engine, forward keyword arguments (`Feed`), sample ids as (source, row)) -> mean loss of the micro-batch
    loss: Callable[[Any, dict[str, Any], list[tuple[int, int]]], torch.Tensor]
    extra: dict[str, Any] | None = None  # what the export's provenance should record (e.g. the teacher)


def causal_lm_loss(engine: Any, inputs: dict[str, Any], ids: list[tuple[int, int]]) -> torch.Tensor:
    return engine(**inputs, labels=inputs["input_ids"]).loss  # type: ignore[no-any-return]


CPT = Objective("cpt", causal_lm_loss)


@dataclass(frozen=True)
class TrainData:
    stream: MixedStream  # the training mixture, a pure function of the step
    val_sets: dict[str, EvalSet]  # "domain" and optionally "general"
    manifests: list[str]  # sha256 of each source's manifest, in order
    seq_len: int
    tokenizer_sha256: str
    eos_id: int  # the sources' end-of-document token


def open_data(cfg: TrainConfig, world: int) -> TrainData:
    """The training sources (checked against the model's tokenizer and each other) and the validation sets."""
    sources = open_sources(cfg.data)
    seq_len = sources[0].seq_len
    tokenizer_sha = tokenizer_fingerprint(cfg.model.path)
    check_compatible(sources, tokenizer_sha, seq_len)
    eval_rows = cfg.eval.batches * cfg.engine.micro_batch * world
    val_sets = {"domain": EvalSet(OpenedSource(cfg.domain_val or cfg.data.sources[0], "val"), eval_rows)}
    if cfg.general_val:
        val_sets["general"] = EvalSet(OpenedSource(cfg.general_val, "val"), eval_rows)
    return TrainData(MixedStream(sources, cfg.data.weights, cfg.data.seed), val_sets,
                     [s.manifest_sha256 for s in sources], seq_len, tokenizer_sha, sources[0].eos_id)


def _engine(cfg: TrainConfig, folder: Path, device: torch.device, main: bool) -> Any:
    engine = build_engine(cfg, load_for_engine(cfg, device.type == "cuda"), device.type == "cuda")
    record_checkpoint_files(engine)  # each rank fsyncs and hashes the checkpoint files it wrote
    if main:  # the configuration DeepSpeed was given, for whoever debugs the run
        publish_json(folder / "deepspeed.json", deepspeed_config(cfg, device.type == "cuda"))
    return engine


def _job_end_time(env: TaskEnv) -> float | None:
    return env.end_time or (slurm_job_end_time(env.job_id) if env.launcher == "slurm" and env.rank == 0 else None)


def _resume(engine: Any, checkpoints: Checkpointer, resumed: Path, load_from: Path, state: TrainState,
            early: EarlyStopping, env: TaskEnv, config_sha256: str) -> None:
    """Weights, optimizer, train state, this rank's RNG and early stopping from the checkpoint `resumed`.

    A checkpoint that fails to load on any rank is set aside and the next older one is loaded in its place
    (DeepSpeed's load replaces every weight and optimizer state, so a failed attempt leaves nothing behind).
    A resume on another rank count loads a universal conversion, which only the first choice was given."""
    rank = env.rank
    while True:
        saved, why = load_checkpoint(engine, load_from, resumed)
        if not (failures := [f"rank {r}: {w}" for r, w in enumerate(all_gather(why)) if w]):
            break
        if rank == 0:
            checkpoints.set_aside(resumed, failures)
        older = checkpoints.choose()
        if older is None or load_from != resumed or saved_world(older) != env.world_size:
            raise RuntimeError(f"cannot resume: {resumed.name} failed to load ({failures[0]}) and was set aside; "
                               + ("no older checkpoint is left" if older is None else
                                  f"rerun to resume from {older.name}"))
        resumed = load_from = older
    assert saved is not None
    if problems := saved.compatible_with(state):
        raise ValueError(f"cannot resume from {resumed}: {'; '.join(problems)}")
    state.load_state_dict({**saved.state_dict(), "config_sha256": config_sha256,
                           "manifest_sha256": state.manifest_sha256})
    if rng_file(resumed, rank).exists():  # absent when this rank did not exist in the saved run
        restore_rng(json.loads(rng_file(resumed, rank).read_text()))
    early.load_state_dict(state.early_stop)
    if rank == 0:
        print(f"[train] resumed from {resumed.name} at step {state.step} ({env.world_size} ranks)", flush=True)


def _mean_across_ranks(value: torch.Tensor) -> float:
    value = value.detach().float().clone()
    if dist.is_initialized():
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value.item())


def _on(device: torch.device, rows: np.ndarray) -> torch.Tensor:
    """A batch on the device: to a GPU from pinned memory without blocking, so the copy overlaps the step."""
    batch = torch.from_numpy(rows)
    return batch.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else batch


def _optimizer_step(engine: Any, objective: Objective, batches: Prefetcher, feed: Feed, lr: float, micro: int,
                    accum: int, world: int, device: torch.device) -> torch.Tensor:
    """One optimizer step over `accum` micro-batches; returns the step's mean loss on this rank."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    step_loss = torch.zeros((), device=device)
    stream = batches.stream
    for m in range(accum):
        rows, ids = batches.next_batch(m)  # the next one is read meanwhile, in a background thread
        loss = objective.loss(engine, feed(_on(device, rows)), ids)
        engine.backward(loss)
        # DeepSpeed counts micro-batches: engine.step() steps the optimizer (and zeroes the gradients) only at
        # the accumulation boundary, every `grad_accum`-th call; the calls before it only accumulate.
        engine.step()
        step_loss += loss.detach() / accum
    stream.advance(micro * accum * world)
    return step_loss


def _record_first_step(log: MetricsLog, resumed: bool, world: int) -> None:
    """What a requeue costs: process start (imports, rendezvous, load) to the first step done."""
    if (age := process_age_s()) is None:
        return
    log.record("first_step", seconds_since_process_start=age, resumed=resumed, world=world)
    if log.active:
        print(f"[train] first step {log.state.step} done {age:.1f} s after process start", flush=True)


def _record_train(log: MetricsLog, engine: Any, cfg: TrainConfig, step_loss: torch.Tensor, lr: float,
                  step_tokens: int, steps_this_attempt: int, started: float) -> None:
    """The train line: every rank takes part (the loss is averaged across ranks), rank 0 writes it."""
    loss_value = _mean_across_ranks(step_loss)
    rate = steps_this_attempt * step_tokens / max(time.monotonic() - started, 1e-9)
    grad_norm = engine.get_global_grad_norm()
    eta = (cfg.steps - log.state.step) * step_tokens / max(rate, 1e-9)
    log.record("train", loss=loss_value, lr=lr, tokens=log.state.tokens, tokens_per_s=rate, eta_s=eta,
               grad_norm=None if grad_norm is None else float(grad_norm))
    if log.active:
        print(f"[train] step {log.state.step}/{cfg.steps} loss {loss_value:.4f} lr {lr:.2e} "
              f"{rate:,.0f} tok/s eta {eta / 60:.1f} min", flush=True)


def checkpoint_due(cfg: TrainConfig, step: int, minutes_since_save: float, new_best: bool) -> bool:
    """A scheduled save: every `every_steps`, at least every `every_minutes`, and at each new best when the best
    weights are to be exported (they must exist as a checkpoint)."""
    every = cfg.checkpoint
    return bool((every.every_steps and step % every.every_steps == 0)
                or (every.every_minutes and minutes_since_save >= every.every_minutes)
                or (new_best and cfg.export == "best"))


def save_checkpoint(checkpoints: Checkpointer, engine: Any, state: TrainState, stream: MixedStream,
                    early: EarlyStopping, rank: int, metric: float | None, log: MetricsLog, reason: str) -> Path:
    """Every rank calls this at the same step; the checkpoint is published whole or not at all."""
    state.loader, state.early_stop = dict(stream.state_dict()), early.state_dict()
    began = time.monotonic()
    path = checkpoints.save(state.step, partial(write_checkpoint, engine, state, rank), metric=metric)
    log.record("checkpoint", path=path.name, reason=reason, seconds=time.monotonic() - began)
    return path


def _export(engine: Any, cfg: TrainConfig, paths: TrainPaths, checkpoints: Checkpointer, early: EarlyStopping,
            state: TrainState, objective: Objective, stopped: str | None, device: torch.device, rank: int,
            interrupted: Callable[[], bool]) -> dict[str, Any]:
    """The final (or best) weights as a Hugging Face folder, with where they came from."""
    best = checkpoints.best_checked() if cfg.export == "best" and early.best is not None else None
    source = None if best is None else _loadable_now(engine, cfg, best, paths, rank)
    result = export_model(engine, cfg, paths.export, source, device, rank, provenance={
        "objective": objective.name, **(objective.extra or {}), "base_model": cfg.model.path,
        "weights": "the last step" if best is None else f"the best checkpoint, {best.name}",
        "data_manifests": state.manifest_sha256, "steps": state.step, "tokens": state.tokens,
        "validation": early.last, "stopped": stopped, "config_sha256": state.config_sha256}, interrupted=interrupted)
    final = early.last.get("domain_loss", math.nan)
    return {"step": state.step, "tokens": state.tokens, "export": str(paths.export), **result,
            "final_domain_loss": None if math.isnan(final) else final}


def _loadable_now(engine: Any, cfg: TrainConfig, checkpoint: Path, paths: TrainPaths, rank: int) -> Path:
    """Where this engine loads `checkpoint` from: the folder itself when it was saved at this rank count, else its
    universal conversion (made now if need be). DeepSpeed reads every checkpoint in the universal format once its
    config says so, and a resume on another rank count said so at start-up: a best checkpoint saved since, at this
    rank count, would then be read as universal and fail. So the engine is told, for this checkpoint, which it is.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    _, load_from = loadable(cfg, checkpoint, paths.folder / "universal", rank, world)
    assert load_from is not None
    engine._config.load_universal_checkpoint = load_from != checkpoint
    return load_from


def _export_unless_stopped(engine: Any, cfg: TrainConfig, paths: TrainPaths, checkpoints: Checkpointer,
                           early: EarlyStopping, state: TrainState, objective: Objective, stopped: str | None,
                           device: torch.device, rank: int, stop: StopRequest, log: MetricsLog) -> dict[str, Any]:
    """The export, left for a requeue when a stop signal comes while rank 0 writes it (the next attempt resumes
    from the final checkpoint and exports). The other ranks wait for rank 0 in a barrier, which breaks when it
    leaves: with the signal received, that is the requeue's doing and they leave the same way."""
    try:
        return _export(engine, cfg, paths, checkpoints, early, state, objective, stopped, device, rank,
                       interrupted=lambda: stop.received_signal is not None)
    except ExportInterrupted as e:
        _leave(stop, log, rank, cfg, str(e), "final checkpoint saved, export not published")
    except Exception:
        if rank == 0 or stop.received_signal is None:
            raise
        _leave(stop, log, rank, cfg, "rank 0 left the export for a requeue", "final checkpoint saved")


def _leave(stop: StopRequest, log: MetricsLog, rank: int, cfg: TrainConfig, reason: str, saved: str) -> NoReturn:
    log.record("stop", reason=reason)
    if log.active:
        print(f"[train] stopping at step {log.state.step}: {reason}; {saved}, exit for requeue", flush=True)
    log.close()
    _exit_for_requeue(stop, rank, cfg.resources.signal_number)


def _exit_for_requeue(stop: StopRequest, rank: int, requeue_signal: signal.Signals) -> NoReturn:
    """Leave after a stop-checkpoint so that the job runs again.

    Under submitit (Slurm or local) its own signal handler requeues the job from rank 0: hand it the
    signal now that the checkpoint is safe. The requeue ends every task of the job, so the other
    ranks wait for that rather than exit and be counted as finished. Elsewhere (torchrun, a plain
    process) exit with REQUEUE_EXIT_CODE: whoever started the process resumes it by running it again.
    """
    received = stop.received_signal
    stop.uninstall()
    if received == signal.SIGTERM:  # scancel, scontrol requeue or a preemption: Slurm is ending the job already
        sys.exit(REQUEUE_EXIT_CODE)
    if os.environ.get("SUBMITIT_EXECUTOR"):
        if rank == 0:
            os.kill(os.getpid(), requeue_signal)
        time.sleep(REQUEUE_GRACE_S)
    sys.exit(REQUEUE_EXIT_CODE)


def train(cfg: TrainConfig, paths: TrainPaths, env: TaskEnv, objective: Objective,
          config_sha256: str) -> dict[str, Any]:
    # Listening before the process group exists: a stop signal during set-up is then only recorded, and all
    # ranks leave together once set up, instead of submitit requeueing from rank 0 in the middle of a rendezvous.
    with StopRequest().install(signals=(cfg.resources.signal_number, signal.SIGTERM)) as stop:
        return _train(cfg, paths, env, objective, config_sha256, stop)


def _train(cfg: TrainConfig, paths: TrainPaths, env: TaskEnv, objective: Objective, config_sha256: str,
           stop: StopRequest) -> dict[str, Any]:
    # --- set up: processes, data, model, engine, state -------------------------------------------------------------
    device = setup_distributed(env)
    cfg = for_device(cfg, device)  # bf16, TF32 and the attention kernel on a GPU; CPU unchanged
    rank, world, main = env.rank, env.world_size, env.rank == 0
    data = open_data(cfg, world)
    checkpoints = Checkpointer(paths.checkpoints, cfg.checkpoint.keep_last, rank, world, dist.barrier,
                               derived=[paths.folder / "universal"])
    resumed = checkpoints.choose()  # the newest whose every file's hash every rank has checked
    cfg, load_from = loadable(cfg, resumed, paths.folder / "universal", rank, world)
    engine = _engine(cfg, paths.folder, device, main)
    state = TrainState(manifest_sha256=data.manifests, config_sha256=config_sha256, seq_len=data.seq_len,
                       model_fingerprint=model_fingerprint(cfg.model.path), tokenizer_sha256=data.tokenizer_sha256)
    stop.set_deadline(_job_end_time(env), margin_s=float(cfg.resources.signal_lead_s))
    early = EarlyStopping(cfg.eval.patience, cfg.eval.min_delta, cfg.eval.forgetting_pct, cfg.eval.forgetting_stop)
    log = MetricsLog(paths.metrics, paths.progress, state, active=main, objective=objective.name, total_steps=cfg.steps)

    # --- resume from the newest valid checkpoint, if any --------------------------------------------------------------
    if resumed is not None and load_from is not None:
        _resume(engine, checkpoints, resumed, load_from, state, early, env, config_sha256)
    data.stream.load_state_dict(state.loader)
    micro, accum = cfg.engine.micro_batch, cfg.engine.grad_accum
    feed = Feed(data.eos_id, cfg.model.document_mask)  # every forward pass, training and evaluation alike
    setup = {**engine_summary(engine), "document_mask": cfg.model.document_mask, "world": world}
    log.record("setup", **setup)
    if main:
        print(f"[train] {objective.name} on {world} ranks ({device.type}): "
              + ", ".join(f"{k}={v}" for k, v in setup.items() if k != "world")
              + f"\n{data.stream.describe(cfg.steps * micro * accum * world)}", flush=True)
    if requested := stop.agree(device):  # it came during set-up: leave before doing work nobody would save
        _leave(stop, log, rank, cfg, requested, "nothing new to save")
    if state.step == 0 and resumed is None:  # the base model's numbers: the reference for the forgetting alarm
        base = evaluate(engine, data.val_sets, micro, device, rank, world, feed)
        early.set_baseline(base)
        log.record("eval", **base, base=True)

    # --- the loop: one iteration per optimizer step ---------------------------------------------------------------
    last_save, started, step_tokens = time.monotonic(), time.monotonic(), micro * accum * world * data.seq_len
    start_step, stopped = state.step, None
    batches = Prefetcher(data.stream, rank, world, micro, accum, enabled=cfg.data.prefetch)
    while state.step < cfg.steps and stopped is None:
        lr = lr_at(state.step, cfg.optim, cfg.steps)
        step_loss = _optimizer_step(engine, objective, batches, feed, lr, micro, accum, world, device)
        state.step += 1
        state.tokens += step_tokens
        if state.step == start_step + 1:
            _record_first_step(log, resumed is not None, world)
        if state.step % cfg.log_every == 0 or state.step == cfg.steps:
            _record_train(log, engine, cfg, step_loss, lr, step_tokens, state.step - start_step, started)
        metric, new_best = None, False
        if state.step % cfg.eval.every == 0 or state.step == cfg.steps:
            metrics = evaluate(engine, data.val_sets, micro, device, rank, world, feed)
            verdict = early.update(state.step, metrics)
            metric, new_best = metrics["domain_loss"], bool(verdict.get("best"))
            log.record("eval", **metrics, **verdict)
            stopped = verdict.get("stop")  # early stopping, or the forgetting alarm when it may stop the run
        due = checkpoint_due(cfg, state.step, (time.monotonic() - last_save) / 60, new_best)
        requested = stop.agree(device)
        if due or requested or stopped or state.step == cfg.steps:
            reason = requested or stopped or ("final" if state.step == cfg.steps else "scheduled")
            save_checkpoint(checkpoints, engine, state, data.stream, early, rank, metric, log, reason)
            last_save = time.monotonic()
        if requested:
            _leave(stop, log, rank, cfg, requested, "checkpoint saved")

    batches.close()
    # --- export: a stop signal during the final save or the export requeues; the next attempt exports ------------
    if requested := stop.agree(device):
        _leave(stop, log, rank, cfg, requested, "final checkpoint saved")
    result = _export_unless_stopped(engine, cfg, paths, checkpoints, early, state, objective, stopped, device,
                                    rank, stop, log)
    log.close()
    return result
