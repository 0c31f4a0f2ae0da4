"""Learning rate for continued pretraining: re-warm from zero to the peak, then re-decay to a floor.

Ibrahim et al. 2024 ("Simple and Scalable Strategies to Continually Pre-train Large Language
Models"): when training resumes on new data, warming the LR up again and decaying it again
recovers most of the loss of retraining from scratch. Cosine decays over all remaining steps;
warmup-stable-decay (WSD) holds the peak and decays only over the last `decay_fraction`.
The LR is a pure function of the step, so resuming needs no scheduler state.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from training.config import OptimConfig


def lr_at(step: int, optim: OptimConfig, total: int) -> float:
    """LR for optimizer step `step` (0-based) of `total` under `optim`'s peak, floor, warm-up and schedule."""
    return lr_from(step, peak=optim.lr, floor=optim.lr * optim.min_lr_ratio, warmup=optim.warmup_steps, total=total,
                   kind=optim.schedule, decay_fraction=optim.decay_fraction)


def lr_from(step: int, *, peak: float, floor: float, warmup: int, total: int, kind: str,
            decay_fraction: float = 0.2) -> float:
    """The schedule itself, in plain numbers."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if kind == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "wsd":
        decay_steps = max(1, round(total * decay_fraction))
        decay_start = total - decay_steps
        if step < decay_start:
            return peak
        progress = min(1.0, (step - decay_start) / decay_steps)
        return floor + (peak - floor) * (1.0 - progress)
    raise ValueError(f"unknown schedule {kind!r}: expected 'cosine' or 'wsd'")
