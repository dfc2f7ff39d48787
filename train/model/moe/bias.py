"""Auxiliary-loss-free load balancing (DeepSeek-V3, arXiv 2412.19437 sec. 2.1.2).

Shape legend: E routed experts.

Each MoE layer counts the tokens that select each expert during training forwards; after the optimizer step
the trainer calls `update_expert_biases`, which nudges each expert's selection bias toward the mean load.
The bias only changes which experts are selected, never the gate weights.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from train.model.moe.layer import MoELayer


@torch.no_grad()
def update_expert_bias(bias_E: torch.Tensor, load_E: torch.Tensor, rate: float) -> None:
    """In place: `bias_E += rate * sign(mean(load) - load)`, raising underloaded and lowering overloaded
    experts (V3's gamma update). Experts exactly at the mean are left alone."""
    load_E = load_E.to(torch.float64)
    bias_E += rate * torch.sign(load_E.mean() - load_E).to(bias_E.dtype)


@torch.no_grad()
def update_expert_biases(
    model: nn.Module, reduce: Optional[Callable[[torch.Tensor], Optional[torch.Tensor]]] = None
) -> None:
    """Update the expert bias of every MoE layer in `model` from its accumulated load, then zero the load.

    `reduce` combines the per-rank loads (e.g. an all-reduce sum over data-parallel ranks, so every rank
    applies the same update and the replicated biases stay identical). It may return the reduced tensor or
    reduce in place and return None. Identity when None.
    """
    for module in model.modules():
        if not isinstance(module, MoELayer) or module.expert_load_E is None:
            continue
        load_E = module.expert_load_E
        if reduce is not None:
            reduced = reduce(load_E)
            load_E = load_E if reduced is None else reduced
        update_expert_bias(module.router.expert_bias_E, load_E, module.moe.bias_update_rate)
        module.expert_load_E.zero_()
