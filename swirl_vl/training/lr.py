"""Learning-rate factors per stage step; pure, so the schedule can be checked by hand."""

from __future__ import annotations

import math
from typing import Literal

LRSchedule = Literal["constant", "cosine", "wsd"]


def lr_factor(
    step: int,
    total_steps: int,
    warmup_steps: int,
    schedule: LRSchedule,
    floor: float = 0.05,
    decay_fraction: float = 0.2,
) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of a stage of ``total_steps``.

    Linear warm-up over ``warmup_steps``, then one of:

    - ``constant``: 1;
    - ``cosine``: a cosine decay to ``floor`` at the stage's last step;
    - ``wsd`` (warm-up, stable, decay): 1 until the last ``decay_fraction`` of the stage, then the same cosine decay
      to ``floor`` over those steps. A model whose learning needs the full rate for long (the sprite IDM's) gets it
      for more of a short stage than under ``cosine``, and still ends annealed.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or total_steps <= warmup_steps + 1:
        return 1.0
    start = warmup_steps
    if schedule == "wsd":
        start = max(warmup_steps, total_steps - max(1, round(decay_fraction * total_steps)))
        if step < start:
            return 1.0
        if total_steps == start + 1:  # a decay of one step: that step is the annealed one
            return floor
    progress = min(1.0, (step - start) / (total_steps - start - 1))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
