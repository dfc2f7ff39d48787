"""AdamW parameter groups: decay on weight matrices only."""
from __future__ import annotations

import torch

from train.config import OptimConfig, load_train_config
from train.model import build_model
from train.trainer.optim import optimizer_factory, param_groups
from train.precision import build_precision
from train.config import PrecisionConfig


def test_decay_on_matrices_only():
    cfg = load_train_config(["model=tiny_deepseek_v3"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    optim_cfg = OptimConfig(weight_decay=0.1)
    opt = optimizer_factory(optim_cfg)(param_groups(model, optim_cfg.weight_decay))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    assert id(model.embed.weight) not in decayed
    assert id(model.lm_head.weight) in decayed
    for pid in decayed:
        assert "norm" not in names[pid]
    assert any("experts" in names[pid] for pid in decayed)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_precision_recipes():
    cpu = torch.device("cpu")
    assert build_precision(PrecisionConfig(name="fp32"), cpu).autocast_dtype is None
    assert build_precision(PrecisionConfig(name="bf16"), cpu).autocast_dtype is None  # bf16 weights, no autocast
    bf16 = build_precision(PrecisionConfig(name="bf16_autocast"), cpu)
    with bf16.autocast():
        y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == torch.bfloat16
