"""AdamW with weight decay on weight matrices only.

Decay is applied to parameters with two or more dimensions (linear weights, stacked expert weights, router
gates) and not to norm gains, biases or embeddings: decaying a gain or bias pulls it toward 0 rather than
toward a "simple" function, and decaying the embedding shrinks rare tokens' rows that receive few gradient
updates (the choice of OLMo-2, torchtitan's llama recipe differs only on embeddings). Expert-balance
biases are buffers, never optimized.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

from train.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decayed group (matrices) and a non-decayed one (the rest)."""
    return [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in named_param_groups(model, weight_decay)]


def named_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """`param_groups` with each group's parameter names (as `model.named_parameters()` spells them) under
    "names", in the order of "params": for callers that classify a group's entries by name (the memory planner)."""
    embedding_params = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    groups = {"decay": ([], []), "no_decay": ([], [])}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        names, params = groups["decay" if p.ndim >= 2 and id(p) not in embedding_params else "no_decay"]
        names.append(name)
        params.append(p)
    return [{"params": groups["decay"][1], "names": groups["decay"][0], "weight_decay": weight_decay},
            {"params": groups["no_decay"][1], "names": groups["no_decay"][0], "weight_decay": 0.0}]


def optimizer_factory(cfg: OptimConfig) -> Callable[[list[dict]], torch.optim.Optimizer]:
    """`param groups -> optimizer` for `cfg` (AdamW; fp32 master weights: parameters are never cast). A factory
    rather than an optimizer, because the engine may regroup the parameters first (DeepSpeed splits expert
    groups off the dense ones)."""
    if cfg.name != "adamw":
        raise ValueError(f"optim.name={cfg.name!r}: only adamw is implemented")
    return functools.partial(torch.optim.AdamW, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
