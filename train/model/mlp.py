"""SwiGLU feed-forward network: dense layers and (fused) shared experts; the gate activations.

Shape legend: T tokens (any leading dims), D model dim, F hidden width.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


# `ModelConfig.ffn_activation` -> the gate's activation. gelu_tanh is Grok-1's GeGLU (jax.nn.gelu's default).
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown ffn_activation {name!r} (expected one of {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[name]


class SwiGLU(nn.Module):
    """`y = w_down(act(w_gate x) * w_up x)`, all projections without bias; act is silu unless configured
    (`gelu_tanh` makes it GeGLU).

    Several SwiGLU experts that always fire are one SwiGLU of the summed width, which is how the MoE layer
    stores its shared experts.
    """

    def __init__(self, d_model: int, hidden: int, act: str = "silu") -> None:
        super().__init__()
        self.act = activation(act)
        self.w_gate = nn.Linear(d_model, hidden, bias=False)
        self.w_up = nn.Linear(d_model, hidden, bias=False)
        self.w_down = nn.Linear(hidden, d_model, bias=False)

    def reset_parameters(self, init_std: float = 0.02) -> None:
        """Draw every weight from normal(0, init_std), the framework-wide init."""
        for lin in (self.w_gate, self.w_up, self.w_down):
            nn.init.normal_(lin.weight, mean=0.0, std=init_std)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.w_down(self.act(self.w_gate(x_TD)) * self.w_up(x_TD))
