"""Learning-rate schedules at their key steps (step = optimizer steps already taken)."""
from __future__ import annotations

import math

import pytest
import torch

from train.config import OptimConfig
from train.trainer.schedule import LRSchedule, lr_multiplier


def _m(schedule, step, max_steps=100, warmup=10, floor=0.1, decay_frac=0.2):
    cfg = OptimConfig(schedule=schedule, warmup_steps=warmup, min_lr_ratio=floor, decay_frac=decay_frac)
    return lr_multiplier(cfg, step, max_steps)


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_linear_warmup(schedule):
    assert _m(schedule, 0) == pytest.approx(0.1)
    assert _m(schedule, 4) == pytest.approx(0.5)
    assert _m(schedule, 9) == pytest.approx(1.0)
    assert _m(schedule, 10) == pytest.approx(1.0)


def test_cosine():
    assert _m("cosine", 55) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert _m("cosine", 32.5) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert _m("cosine", 100) == pytest.approx(0.1)
    assert _m("cosine", 150) == pytest.approx(0.1)  # past the end: stays at the floor
    values = [_m("cosine", s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_wsd():
    assert _m("wsd", 50) == 1.0 and _m("wsd", 79) == 1.0  # stable until the last 20% of 100 steps
    assert _m("wsd", 80) == pytest.approx(1.0)
    assert _m("wsd", 90) == pytest.approx(0.1 + 0.9 * 0.5)
    assert _m("wsd", 100) == pytest.approx(0.1)


def test_constant_and_no_warmup():
    assert _m("constant", 99) == 1.0
    assert _m("cosine", 0, warmup=0) == pytest.approx(1.0)


def test_schedule_sets_optimizer_lr_from_step_alone():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = LRSchedule(OptimConfig(lr=2e-3, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1), 100)
    assert sched.apply(opt, 4) == pytest.approx(1e-3)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    assert sched.lr_at(100) == pytest.approx(2e-4)
