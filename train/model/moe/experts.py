"""Routed experts stored as stacked weights, computed with one grouped GEMM per projection.

Shape legend: N routed rows (token copies, grouped by expert in ascending order), D model dim,
F expert hidden, E experts (local experts once `parallel/` has sliced the stacks).
"""
from __future__ import annotations

import torch
from torch import nn

from train.model.mlp import activation


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: `torch._grouped_mm`'s backward rejects
    expanded (stride-0) gradients such as the one `y.sum().backward()` produces."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _grouped_mm_supported(x_NI: torch.Tensor, w_EIO: torch.Tensor) -> bool:
    # The kernel needs 16-byte aligned row strides; other shapes (odd tiny test widths) take the loop.
    if not hasattr(torch, "_grouped_mm") or x_NI.dtype not in (torch.float32, torch.bfloat16):
        return False
    if x_NI.is_cuda and x_NI.dtype != torch.bfloat16:
        return False  # the CUDA kernel's documented dtype is bf16; not verified for fp32 yet
    if x_NI.dtype != torch.bfloat16 and torch.compiler.is_compiling():
        return False  # the op's meta (fake-tensor) kernel accepts bf16 only, so tracing fp32 would fail
    align = 16 // x_NI.element_size()
    return x_NI.dtype == w_EIO.dtype and w_EIO.shape[1] % align == 0 and w_EIO.shape[2] % align == 0


def grouped_mm(x_NI: torch.Tensor, w_EIO: torch.Tensor, num_tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """Row block e of `x_NI` (length `num_tokens_per_expert_E[e]`) times `w_EIO[e]`; returns `y_NO`.

    The single place that chooses the kernel: `torch._grouped_mm` (works on CPU and Hopper GPUs in this torch,
    including backward and experts with zero rows), else a loop over experts (also for fp32 under
    `torch.compile`, whose tracing of `_grouped_mm` is bf16-only).
    """
    if _grouped_mm_supported(x_NI, w_EIO):
        offs_E = torch.cumsum(num_tokens_per_expert_E, dim=0, dtype=torch.int32)
        return _ContiguousGrad.apply(torch._grouped_mm(x_NI.contiguous(), w_EIO, offs=offs_E))
    chunks = torch.split(x_NI, num_tokens_per_expert_E.tolist(), dim=0)
    return torch.cat([chunk @ w_EIO[e] for e, chunk in enumerate(chunks)], dim=0)


class GroupedExperts(nn.Module):
    """E SwiGLU experts: `y = (silu(x W_gate[e]) * (x W_up[e])) W_down[e]` for the rows routed to expert e
    (another gate activation when `act` says so: `train/model/mlp.py` ACTIVATIONS).

    Weights are stacked along a leading expert dimension so `parallel/` can shard them by expert by slicing
    dim 0 (and then set `num_experts` to the local count).
    """

    def __init__(self, num_experts: int, d_model: int, hidden: int, act: str = "silu") -> None:
        super().__init__()
        self.num_experts = num_experts
        self.act = activation(act)
        self.w_gate_EDF = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.w_up_EDF = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.w_down_EFD = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        self.reset_parameters()

    def reset_parameters(self, init_std: float = 0.02) -> None:
        """Draw every weight from normal(0, init_std), the framework-wide init."""
        for w in (self.w_gate_EDF, self.w_up_EDF, self.w_down_EFD):
            nn.init.normal_(w, mean=0.0, std=init_std)

    def forward(self, x_ND: torch.Tensor, num_tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """`x_ND` rows grouped by expert ascending, block sizes `num_tokens_per_expert_E`; returns `y_ND`."""
        h_NF = self.act(grouped_mm(x_ND, self.w_gate_EDF, num_tokens_per_expert_E))
        h_NF = h_NF * grouped_mm(x_ND, self.w_up_EDF, num_tokens_per_expert_E)
        return grouped_mm(h_NF, self.w_down_EFD, num_tokens_per_expert_E)
