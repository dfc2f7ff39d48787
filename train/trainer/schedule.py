"""Learning-rate schedules as multipliers of `optim.lr`, a pure function of the step.

`step` is the number of optimizer steps already taken (0 for the first update), so the lr of the update
that completes step s is `lr * lr_multiplier(cfg, s - 1, max_steps)`. All schedules share a linear warmup
from lr/warmup to lr over `warmup_steps` updates:
- `cosine`: then half a cosine from lr down to min_lr_ratio·lr, reached at step max_steps;
- `wsd`: warmup, stable at lr, then a linear decay to min_lr_ratio·lr over the last decay_frac·max_steps steps;
- `constant`: lr after the warmup (warmup_steps=0 for a flat lr).
Being stateless, the schedule resumes exactly from the step alone (and a resumed run may change
max_steps, e.g. to extend a wsd run's stable phase).
"""
from __future__ import annotations

import math

import torch

from train.config import OptimConfig


def lr_multiplier(cfg: OptimConfig, step: int, max_steps: int) -> float:
    """Multiplier of `cfg.lr` for the update taken after `step` completed steps."""
    warmup, floor = cfg.warmup_steps, cfg.min_lr_ratio
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "wsd":
        decay_steps = round(cfg.decay_frac * max_steps)
        decay_start = max_steps - decay_steps
        if step < decay_start or decay_steps == 0:
            return 1.0
        remaining = max(0.0, (max_steps - step) / decay_steps)
        return floor + (1.0 - floor) * remaining
    raise ValueError(f"optim.schedule={cfg.schedule!r}: choose cosine, wsd or constant")


class LRSchedule:
    """Sets the optimizer's lr for each update from the step alone (so resuming needs no scheduler state)."""

    def __init__(self, cfg: OptimConfig, max_steps: int):
        self.cfg, self.max_steps = cfg, max_steps

    def lr_at(self, step: int) -> float:
        return self.cfg.lr * lr_multiplier(self.cfg, step, self.max_steps)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every param group's lr for the update after `step` completed steps; return it."""
        lr = self.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        return {"schedule": str(self.cfg.schedule), "max_steps": self.max_steps}  # plain str: safe-loadable

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore: the lr is a function of the step (kept for the checkpoint's record)."""
