"""Held-out evaluation, early stopping and the forgetting alarm."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate(engine: Any, val_sets: dict[str, Any], micro_batch: int, device: torch.device, rank: int,
             world: int, feed: Callable[[torch.Tensor], dict[str, Any]]) -> dict[str, float]:
    """Token-weighted mean loss and perplexity per validation set, identical on every rank.

    Every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively). `feed` makes a
    forward pass's arguments (training.doc_mask.Feed): evaluation sees documents as training does.
    """
    engine.eval()
    metrics: dict[str, float] = {}
    for name, val_set in val_sets.items():
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss * tokens, tokens
        for batch in val_set.batches(micro_batch, rank, world):
            input_ids = torch.from_numpy(batch).to(device)
            loss = engine(**feed(input_ids), labels=input_ids).loss
            predicted = input_ids.shape[0] * (input_ids.shape[1] - 1)  # labels shift by one inside the model
            totals += torch.tensor([float(loss) * predicted, predicted], dtype=torch.float64, device=device)
        if dist.is_initialized():
            dist.all_reduce(totals)
        mean = float(totals[0] / totals[1]) if totals[1] > 0 else math.nan
        metrics[f"{name}_loss"] = mean
        metrics[f"{name}_ppl"] = math.exp(min(mean, 50.0))
    engine.train()
    return metrics


class EarlyStopping:
    """Tracks the best domain loss, counts evaluations without improvement, and raises the
    forgetting alarm when general perplexity climbs too far above the base model's.

    `update`'s verdict holds "stop" (why, in words) when the run should end here: `patience` evaluations without
    improvement, or the alarm with `forgetting_stop`."""

    def __init__(self, patience: int, min_delta: float, forgetting_pct: float, forgetting_stop: bool = False) -> None:
        self.patience, self.min_delta, self.forgetting_pct = patience, min_delta, forgetting_pct
        self.forgetting_stop = forgetting_stop
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0
        self.baseline: dict[str, float] = {}
        self.last: dict[str, float] = {}

    def set_baseline(self, metrics: dict[str, float]) -> None:
        self.baseline = dict(metrics)
        self.last = dict(metrics)

    def update(self, step: int, metrics: dict[str, float]) -> dict[str, Any]:
        self.last = dict(metrics)
        verdict: dict[str, Any] = {}
        loss = metrics["domain_loss"]
        if self.best is None or loss < self.best - self.min_delta:
            self.best, self.best_step, self.bad_evals = loss, step, 0
            verdict["best"] = True
        else:
            self.bad_evals += 1
        if self.patience and self.bad_evals >= self.patience:
            verdict["stop"] = f"early stopping: no improvement in {self.patience} evaluations"
        base = self.baseline.get("general_ppl")
        if base and "general_ppl" in metrics:
            rise = 100.0 * (metrics["general_ppl"] / base - 1.0)
            verdict["forgetting_pct"] = rise
            if rise > self.forgetting_pct:
                verdict["forgetting_alarm"] = True
                print(f"[train] WARNING forgetting alarm at step {step}: general perplexity "
                      f"{metrics['general_ppl']:.2f} is {rise:.1f}% above the base model's {base:.2f}", flush=True)
                if self.forgetting_stop:
                    verdict["stop"] = (f"forgetting alarm: general perplexity {rise:.1f}% above the base model's "
                                       f"(eval.forgetting_pct = {self.forgetting_pct:g})")
        return verdict

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals,
                "baseline": self.baseline, "last": self.last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if state.get("version") != 1:
            raise ValueError(f"early-stopping state version {state.get('version')!r} is not supported")
        self.best, self.best_step, self.bad_evals = state["best"], state["best_step"], state["bad_evals"]
        self.baseline, self.last = dict(state["baseline"]), dict(state["last"])
