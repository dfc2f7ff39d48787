"""The reference for one routed expert, written out from `GroupedExperts`' stacked weights, for tests that check
a layer's output token by token."""
import torch
import torch.nn.functional as F


def expert_ffn(experts, e: int, x: torch.Tensor, act=F.silu) -> torch.Tensor:
    """Expert `e` of `experts` on rows `x` (..., D): `(act(x W_gate[e]ᵀ) * x W_up[e]ᵀ) W_down[e]ᵀ`."""
    w_HD, f = experts.w_gate_up_EHD[e], experts.hidden
    return (act(x @ w_HD[:f].t()) * (x @ w_HD[f:].t())) @ experts.w_down_EDF[e].t()
