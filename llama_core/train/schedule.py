"""Learning-rate schedule: linear warmup, then cosine decay to ``min_lr_ratio * lr``.

A pure function of the step, so resuming needs nothing but the step counter to restore the schedule.
"""

from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.1) -> float:
    """The learning rate for optimizer step ``step`` (0-based).

    Warmup goes from ``lr / warmup_steps`` (step 0 still moves the weights) up to ``lr`` at step
    ``warmup_steps - 1``; the cosine then falls to ``min_lr_ratio * lr`` at the last step.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(max_steps - warmup_steps - 1, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    floor = lr * min_lr_ratio
    return floor + 0.5 * (lr - floor) * (1.0 + math.cos(math.pi * progress))
