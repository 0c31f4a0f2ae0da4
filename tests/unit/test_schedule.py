"""The LR schedule of continued pretraining (training/schedule.py): a linear re-warm from zero to the peak, then a
cosine re-decay over the remaining steps, or warmup-stable-decay (WSD) holding the peak until its last share."""

from __future__ import annotations

import math

import pytest

from launcher.run_config import load_run_config
from training.schedule import lr_at, lr_from

PEAK, FLOOR, WARMUP, TOTAL = 1e-3, 1e-4, 10, 110


@pytest.mark.parametrize("kind", ["cosine", "wsd"])
def test_both_schedules_rewarm_linearly_from_zero_to_the_peak(kind: str) -> None:
    warm = [lr_from(s, peak=PEAK, floor=FLOOR, warmup=WARMUP, total=TOTAL, kind=kind) for s in range(WARMUP + 1)]
    # Step 0 already trains (at peak / warmup), step warmup - 1 reaches the peak: no step is spent at LR 0.
    assert warm[:WARMUP] == pytest.approx([PEAK * (s + 1) / WARMUP for s in range(WARMUP)])
    assert warm[WARMUP] == pytest.approx(PEAK)
    assert all(a < b for a, b in zip(warm[:WARMUP - 1], warm[1:WARMUP], strict=True))


def test_cosine_decays_from_the_peak_to_the_floor_over_the_remaining_steps() -> None:
    lrs = [lr_from(s, peak=PEAK, floor=FLOOR, warmup=WARMUP, total=TOTAL, kind="cosine") for s in range(TOTAL + 5)]
    decay = lrs[WARMUP:TOTAL + 1]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False)), "strictly decreasing after the warm-up"
    middle = WARMUP + (TOTAL - WARMUP) // 2
    assert lrs[middle] == pytest.approx((PEAK + FLOOR) / 2), "half way down at half the decay"
    assert lrs[TOTAL] == pytest.approx(FLOOR) and lrs[TOTAL + 4] == pytest.approx(FLOOR), "the floor, then held"
    quarter = WARMUP + (TOTAL - WARMUP) // 4
    assert lrs[quarter] == pytest.approx(FLOOR + (PEAK - FLOOR) * 0.5 * (1 + math.cos(math.pi / 4)))


def test_wsd_holds_the_peak_then_decays_linearly_over_its_last_share() -> None:
    lrs = [lr_from(s, peak=PEAK, floor=FLOOR, warmup=WARMUP, total=TOTAL, kind="wsd", decay_fraction=0.2)
           for s in range(TOTAL + 1)]
    decay_start = TOTAL - round(0.2 * TOTAL)  # 88
    assert lrs[WARMUP - 1:decay_start + 1] == pytest.approx([PEAK] * (decay_start - WARMUP + 2)), "stable"
    assert lrs[decay_start + 11] == pytest.approx(PEAK - (PEAK - FLOOR) * 11 / 22), "linear"
    assert lrs[TOTAL] == pytest.approx(FLOOR)
    steps = lrs[decay_start:]
    assert all(a > b for a, b in zip(steps, steps[1:], strict=False))


def test_the_config_drives_the_schedule_and_an_unknown_one_is_refused() -> None:
    optim = load_run_config(None, ["cpt.optim.lr=2e-4", "cpt.optim.min_lr_ratio=0.5", "cpt.optim.warmup_steps=4",
                                   "cpt.optim.schedule=wsd", "cpt.optim.decay_fraction=0.5"]).cpt.optim
    assert [lr_at(s, optim, 12) for s in (0, 3, 5, 6, 9, 12)] == pytest.approx(
        [5e-5, 2e-4, 2e-4, 2e-4, 1.5e-4, 1e-4])
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        lr_from(20, peak=PEAK, floor=FLOOR, warmup=WARMUP, total=TOTAL, kind="linear")
    with pytest.raises(ValueError, match="schedule"):
        load_run_config(None, ["cpt.optim.schedule=linear"])
