"""The training loop shared by continued pretraining and distillation.

The two differ in the `Objective` (the loss, and for distillation a frozen teacher), not here.
Read top to bottom: set up, resume, then per optimizer step: LR, micro-batches, log, evaluate,
checkpoint, stop; at the end export.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sharding.tokenize import tokenizer_fingerprint
from slurm.files import write_json_atomic
from slurm.requeue import REQUEUE_GRACE_S
from slurm.taskenv import TaskEnv, process_age_s, slurm_job_end_time
from training.checkpoint import Checkpointer, TrainState, capture_rng, restore_rng, rng_file
from training.config import TrainConfig
from training.data import EvalSet, MixedStream, OpenedSource, check_compatible
from training.engine import build_engine, deepspeed_config, load_model, model_fingerprint, setup_distributed
from training.evaluate import EarlyStopping, evaluate
from training.export import export_model
from training.schedule import lr_at
from training.stop import REQUEUE_EXIT_CODE, StopRequest

TRAIN_STATE = "train_state.json"  # inside each checkpoint, written by rank 0
PROGRESS = "progress.json"  # in the stage folder: the latest numbers, for `stillroom status`


@dataclass(frozen=True)
class Objective:
    name: str  # "cpt" or "distill"
    # (engine, input_ids, sample ids as (source, row)) -> mean loss of the micro-batch
    loss: Callable[[Any, torch.Tensor, list[tuple[int, int]]], torch.Tensor]
    extra: dict[str, Any] | None = None  # what the export's provenance should record (e.g. the teacher)


def causal_lm_loss(engine: Any, input_ids: torch.Tensor, ids: list[tuple[int, int]]) -> torch.Tensor:
    return engine(input_ids=input_ids, labels=input_ids).loss  # type: ignore[no-any-return]


CPT = Objective("cpt", causal_lm_loss)


def _mean_across_ranks(value: torch.Tensor) -> float:
    value = value.detach().float().clone()
    if dist.is_initialized():
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value.item())


def _exit_for_requeue(stop: StopRequest, rank: int, requeue_signal: signal.Signals) -> None:
    """Leave after a stop-checkpoint so that the job runs again.

    Under submitit (Slurm or local) its own signal handler requeues the job from rank 0: hand it the
    signal now that the checkpoint is safe. The requeue ends every task of the job, so the other
    ranks wait for that rather than exit and be counted as finished. Elsewhere (torchrun, a plain
    process) exit with REQUEUE_EXIT_CODE, which a batch script or the launcher turns into a requeue.
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


def _saved_world(checkpoint: Path) -> int:
    return int(json.loads((checkpoint / "COMPLETE").read_text()).get("world_size", 0))


def _universal(checkpoint: Path, root: Path, rank: int) -> Path:
    """The checkpoint in DeepSpeed's universal format (converted once, by rank 0), loadable on any rank count."""
    target = root / checkpoint.name
    if rank == 0 and not target.exists():
        from deepspeed.checkpoint.ds_to_universal import main as to_universal
        from deepspeed.checkpoint.ds_to_universal import parse_arguments

        tmp = root / f"{checkpoint.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
        saved_argv = sys.argv
        try:
            sys.argv = ["ds_to_universal", "--input_folder", str(checkpoint), "--output_folder", str(tmp),
                        "--num_extract_workers", "1", "--num_merge_workers", "1"]
            to_universal(parse_arguments())
        finally:
            sys.argv = saved_argv
        tmp.rename(target)
    if dist.is_initialized():
        dist.barrier()
    return target


def _choose_checkpoint(checkpoints: Checkpointer, rank: int) -> Path | None:
    """Rank 0 validates and picks; the others follow, so a lagging shared filesystem cannot split them."""
    choice = [str(checkpoints.latest_valid()) if rank == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(choice, src=0)
    return None if choice[0] in (None, "None") else Path(choice[0])


def train(cfg: TrainConfig, out: Path, env: TaskEnv, objective: Objective, config_sha256: str) -> dict[str, Any]:
    # Listening before the process group exists: a stop signal during set-up is then only recorded, and all
    # ranks leave together once set up, instead of submitit requeueing from rank 0 in the middle of a rendezvous.
    with StopRequest().install(signals=(cfg.resources.signal_number, signal.SIGTERM)) as stop:
        return _train(cfg, out, env, objective, config_sha256, stop)


def _train(cfg: TrainConfig, out: Path, env: TaskEnv, objective: Objective, config_sha256: str,
           stop: StopRequest) -> dict[str, Any]:
    # --- set up: processes, data, model, engine, state --------------------------------------------------------
    device = setup_distributed(env)
    rank, world, main = env.rank, env.world_size, env.rank == 0
    sources = [OpenedSource(path, "train", cfg.data.verify_hashes) for path in cfg.data.sources]
    seq_len = sources[0].seq_len
    tokenizer_sha = tokenizer_fingerprint(cfg.model.path)
    check_compatible(sources, tokenizer_sha, seq_len)
    stream = MixedStream(sources, cfg.data.weights, cfg.data.seed)
    eval_rows = cfg.eval.batches * cfg.engine.micro_batch * world
    val_sets = {"domain": EvalSet(OpenedSource(cfg.domain_val or cfg.data.sources[0], "val"), eval_rows)}
    if cfg.general_val:
        val_sets["general"] = EvalSet(OpenedSource(cfg.general_val, "val"), eval_rows)
    checkpoints = Checkpointer(out / "checkpoints", cfg.checkpoint.keep_last, rank, world, dist.barrier)
    resumed = _choose_checkpoint(checkpoints, rank)
    load_from = resumed
    if resumed is not None and _saved_world(resumed) != world and cfg.engine.zero_stage > 0:
        # ZeRO shards optimizer state by rank; another rank count needs DeepSpeed's universal format.
        load_from = _universal(resumed, out / "universal", rank)
        cfg = replace(cfg, engine=replace(cfg.engine, overrides={**cfg.engine.overrides,
                                                                  "checkpoint.load_universal": "true"}))
    model = load_model(cfg.model.path, cfg.model.dtype, cfg.model.dropout, cfg.model.gradient_checkpointing)
    engine = build_engine(cfg, model, device.type == "cuda")
    if main:
        write_json_atomic(out / "deepspeed.json", deepspeed_config(cfg, device.type == "cuda"))
    state = TrainState(manifest_sha256=[s.manifest_sha256 for s in sources], config_sha256=config_sha256,
                       model_fingerprint=model_fingerprint(cfg.model.path), tokenizer_sha256=tokenizer_sha,
                       seq_len=seq_len)
    end_time = env.end_time or (slurm_job_end_time(env.job_id) if env.launcher == "slurm" and main else None)
    stop.set_deadline(end_time, margin_s=float(cfg.resources.signal_lead_s))
    early = EarlyStopping(cfg.eval.patience, cfg.eval.min_delta, cfg.eval.forgetting_pct)
    log = (out / "metrics.jsonl").open("a") if main else None
    # Carried over from the previous attempt, so status keeps showing the last evaluation after a requeue.
    progress: dict[str, Any] = json.loads((out / PROGRESS).read_text()) if main and (out / PROGRESS).exists() else {}
    progress.update(objective=objective.name, total_steps=cfg.steps)

    def record(kind: str, **values: Any) -> None:
        if log is None:
            return
        log.write(json.dumps({"kind": kind, "step": state.step, "time": time.time(), **values}) + "\n")
        log.flush()
        if kind in ("train", "eval", "checkpoint", "stop"):
            if kind == "eval":
                progress["forgetting_alarm"] = bool(values.get("forgetting_alarm"))
            progress.update({k: v for k, v in values.items() if isinstance(v, (int, float, str)) and k != "base"},
                            step=state.step, tokens=state.tokens, updated=time.time(), last_event=kind)
            write_json_atomic(out / PROGRESS, progress)

    # --- resume from the newest valid checkpoint, if any ---------------------------------------------------------
    if resumed is not None and load_from is not None:
        engine.load_checkpoint(str(load_from.parent), tag=load_from.name, load_lr_scheduler_states=False)
        saved = TrainState()
        saved.load_state_dict(json.loads((resumed / TRAIN_STATE).read_text()))
        if problems := saved.compatible_with(state):
            raise ValueError(f"cannot resume from {resumed}: {'; '.join(problems)}")
        state.load_state_dict({**saved.state_dict(), "config_sha256": config_sha256,
                               "manifest_sha256": state.manifest_sha256})
        if rng_file(resumed, rank).exists():  # absent when this rank did not exist in the saved run
            restore_rng(json.loads(rng_file(resumed, rank).read_text()))
        early.load_state_dict(state.early_stop)
        if main:
            print(f"[train] resumed from {resumed.name} at step {state.step} ({world} ranks)", flush=True)
    stream.load_state_dict(state.loader)
    if main:
        planned = cfg.steps * cfg.engine.micro_batch * cfg.engine.grad_accum * world
        print(f"[train] {objective.name} on {world} ranks ({device.type}):\n{stream.describe(planned)}", flush=True)

    def save(reason: str, metric: float | None) -> None:
        state.loader, state.early_stop = dict(stream.state_dict()), early.state_dict()

        def write(folder: Path) -> None:
            # The (empty) universal info lets ds_to_universal convert it for a resume on another rank count.
            engine.save_checkpoint(str(folder.parent), tag=folder.name, save_latest=False,
                                   client_state={"universal_checkpoint_info": {}})
            write_json_atomic(rng_file(folder, rank), capture_rng())
            if main:
                write_json_atomic(folder / TRAIN_STATE, state.state_dict())

        began = time.monotonic()
        path = checkpoints.save(state.step, write, metric=metric)
        record("checkpoint", path=path.name, reason=reason, seconds=time.monotonic() - began)

    def leave(reason: str, saved: str) -> None:
        record("stop", reason=reason)
        if main:
            print(f"[train] stopping at step {state.step}: {reason}; {saved}, exit for requeue", flush=True)
        if log is not None:
            log.close()
        _exit_for_requeue(stop, rank, cfg.resources.signal_number)

    if requested := stop.agree(device):  # it came during set-up: leave before doing work nobody would save
        leave(requested, "nothing new to save")
    if state.step == 0 and resumed is None:  # the base model's numbers: the reference for the forgetting alarm
        base = evaluate(engine, val_sets, cfg.engine.micro_batch, device, rank, world)
        early.set_baseline(base)
        record("eval", **base, base=True)

    # --- the loop: one iteration per optimizer step ---------------------------------------------------------------
    micro, accum = cfg.engine.micro_batch, cfg.engine.grad_accum
    last_save, started, step_tokens = time.monotonic(), time.monotonic(), micro * accum * world * seq_len
    start_step, stopped = state.step, None
    while state.step < cfg.steps and stopped is None:
        lr = lr_at(state.step, peak=cfg.optim.lr, floor=cfg.optim.lr * cfg.optim.min_lr_ratio,
                   warmup=cfg.optim.warmup_steps, total=cfg.steps, kind=cfg.optim.schedule,
                   decay_fraction=cfg.optim.decay_fraction)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        step_loss = torch.zeros((), device=device)
        for m in range(accum):
            rows, ids = stream.next_batch(m, rank, world, micro, accum)
            loss = objective.loss(engine, torch.from_numpy(rows).to(device), ids)
            engine.backward(loss)
            engine.step()
            step_loss += loss.detach() / accum
        stream.advance(micro * accum * world)
        state.step += 1
        state.tokens += step_tokens
        if state.step == start_step + 1 and (age := process_age_s()) is not None:
            # What a requeue costs: process start (imports, rendezvous, load) to the first step done.
            record("first_step", seconds_since_process_start=age, resumed=resumed is not None, world=world)
            if main:
                print(f"[train] first step {state.step} done {age:.1f} s after process start", flush=True)
        if state.step % cfg.log_every == 0 or state.step == cfg.steps:
            loss_value = _mean_across_ranks(step_loss)
            rate = (state.step - start_step) * step_tokens / max(time.monotonic() - started, 1e-9)
            grad_norm = engine.get_global_grad_norm()
            eta = (cfg.steps - state.step) * step_tokens / max(rate, 1e-9)
            record("train", loss=loss_value, lr=lr, tokens=state.tokens, tokens_per_s=rate, eta_s=eta,
                   grad_norm=None if grad_norm is None else float(grad_norm))
            if main:
                print(f"[train] step {state.step}/{cfg.steps} loss {loss_value:.4f} lr {lr:.2e} "
                      f"{rate:,.0f} tok/s eta {eta / 60:.1f} min", flush=True)
        metric, new_best = None, False
        if state.step % cfg.eval.every == 0 or state.step == cfg.steps:
            metrics = evaluate(engine, val_sets, cfg.engine.micro_batch, device, rank, world)
            verdict = early.update(state.step, metrics)
            metric, new_best = metrics["domain_loss"], bool(verdict.get("best"))
            record("eval", **metrics, **verdict)
            if verdict.get("stop"):
                stopped = f"early stopping: no improvement in {cfg.eval.patience} evaluations"
        minutes = (time.monotonic() - last_save) / 60
        due = (cfg.checkpoint.every_steps and state.step % cfg.checkpoint.every_steps == 0) or (
            cfg.checkpoint.every_minutes and minutes >= cfg.checkpoint.every_minutes) or (
            new_best and cfg.export == "best")  # the best weights must exist as a checkpoint to be exported
        requested = stop.agree(device)
        if due or requested or stopped or state.step == cfg.steps:
            save(requested or stopped or ("final" if state.step == cfg.steps else "scheduled"), metric)
            last_save = time.monotonic()
        if requested:
            leave(requested, "checkpoint saved")

    # --- export -------------------------------------------------------------------------------------------------
    source = checkpoints.best() if cfg.export == "best" and early.best is not None else None
    result = export_model(engine, cfg, out / "export", source, device, rank, provenance={
        "objective": objective.name, **(objective.extra or {}), "base_model": cfg.model.path,
        "data_manifests": state.manifest_sha256, "steps": state.step, "tokens": state.tokens,
        "validation": early.last, "stopped": stopped, "config_sha256": config_sha256})
    if log is not None:
        log.close()
    final = early.last.get("domain_loss", math.nan)
    return {"step": state.step, "tokens": state.tokens, "export": str(out / "export"), **result,
            "final_domain_loss": None if math.isnan(final) else final}
