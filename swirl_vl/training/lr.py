"""Learning-rate factors per stage step; pure, so the schedule can be checked by hand."""

from __future__ import annotations

import math
from typing import Literal

LRSchedule = Literal["constant", "cosine"]


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: LRSchedule, floor: float = 0.05) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of a stage of ``total_steps``.

    Linear warm-up over ``warmup_steps``, then constant or a cosine decay to ``floor`` at the stage's last step.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or total_steps <= warmup_steps + 1:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps - 1))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
