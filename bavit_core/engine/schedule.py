"""Learning-rate schedules as a factor of the base rate at each optimizer step, so that a
run resumed at any epoch recomputes exactly the rate an uninterrupted one would use."""
from __future__ import annotations

import math

SCHEDULES = ("step", "cosine")


def lr_factor(schedule: str, step: int, steps_per_epoch: int, epochs: int, step_size: int = 30,
              gamma: float = 0.1, warmup_epochs: int = 0) -> float:
    """Factor of the base learning rate at optimizer step ``step`` (0-based).

    ``warmup_epochs`` ramps linearly from 1/W to 1 over its W steps; then ``step`` multiplies
    by ``gamma`` every ``step_size`` epochs (counted from the first epoch, warm-up included),
    and ``cosine`` decays from 1 to 0 over the steps after warm-up."""
    warm = warmup_epochs * steps_per_epoch
    if warm > 0 and step < warm:
        return (step + 1) / warm
    if schedule == "step":
        return gamma ** ((step // steps_per_epoch) // step_size)
    if schedule != "cosine":
        raise ValueError(f"unknown schedule {schedule!r}")
    total = epochs * steps_per_epoch
    t = (step - warm) / max(total - warm, 1)
    return 0.5 * (1 + math.cos(math.pi * min(max(t, 0.0), 1.0)))
