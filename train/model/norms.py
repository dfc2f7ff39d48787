"""Normalisation layers: RMSNorm (Mixtral, DeepSeek) and LayerNorm without bias (DBRX).

Both normalise in fp32 whatever the activation dtype, because the mean of squares over thousands of channels
loses most of its precision in bf16; the weight is applied after casting back, exactly as the Hugging Face
reference implementations do, so fp32 runs match them bit for bit; the output has the input's dtype whatever the
weight's (fp32 under precision=bf16, whose activations are bf16). A bf16 input is kept for backward as it is, not
as the fp32 copy the statistics are taken on (`train/model/upcast.py`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from train.model.upcast import upcast_op


class _ScaledNorm(nn.Module):
    """A normalisation with a learned per-channel scale (initialised to one) and no bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class RMSNorm(_ScaledNorm):
    """y = weight · x / sqrt(mean(x²) + eps), the statistics taken in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__(dim, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upcast_op(self._norm, x, self.weight)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        # The product is cast back too: an fp32 weight times a bf16 input would otherwise promote to fp32
        # (precision=bf16 keeps norm weights fp32 and the residual stream bf16). fp32 runs: the same numbers.
        return (weight * x32.to(x.dtype)).to(x.dtype)


class LayerNorm(_ScaledNorm):
    """LayerNorm with a scale and no bias (DBRX), computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__(dim, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upcast_op(self._norm, x, self.weight)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), (x.shape[-1],), weight.float(), None, self.eps).to(x.dtype)


NORMS = (RMSNorm, LayerNorm)


def build_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """`kind` is `ModelConfig.norm`: `rmsnorm` or `layernorm` (without bias)."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    if kind == "layernorm":
        return LayerNorm(dim, eps)
    raise ValueError(f"unknown norm kind {kind!r} (expected 'rmsnorm' or 'layernorm')")
