"""SwiGLU feed-forward network: dense layers and (fused) shared experts.

Shape legend: T tokens (any leading dims), D model dim, F hidden width.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """`y = w_down(silu(w_gate x) * w_up x)`, all projections without bias.

    Several SwiGLU experts that always fire are one SwiGLU of the summed width, which is how the MoE layer
    stores its shared experts.
    """

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w_gate = nn.Linear(d_model, hidden, bias=False)
        self.w_up = nn.Linear(d_model, hidden, bias=False)
        self.w_down = nn.Linear(hidden, d_model, bias=False)

    def reset_parameters(self, init_std: float = 0.02) -> None:
        """Draw every weight from normal(0, init_std), the framework-wide init."""
        for lin in (self.w_gate, self.w_up, self.w_down):
            nn.init.normal_(lin.weight, mean=0.0, std=init_std)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x_TD)) * self.w_up(x_TD))
