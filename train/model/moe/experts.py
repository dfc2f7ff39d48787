"""Routed experts stored as stacked weights, computed with one grouped GEMM for gate+up and one for down.

Shape legend: N routed rows (token copies, grouped by expert in ascending order), D model dim,
F expert hidden, H = 2F (gate and up rows together), E experts (local experts once `parallel/` has sliced
the stacks), I / O a GEMM's input / output width.

Layout: each expert's weights are stored as `nn.Linear` stores them, (out, in): `w_gate_up_EHD` (E, 2F, D)
with the gate's F rows first, then the up projection's, and `w_down_EDF` (E, D, F). This is transformers 5's
`gate_up_proj` / `down_proj` and torchtitan's layout. Its transpose (E, in, out) is a column-major view, which
`torch._grouped_mm` takes as it is and torchao's FP8 grouped GEMM requires, so neither kernel copies a weight;
and gate and up share one GEMM over the same rows.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from train.model.mlp import activation
from train.model.moe.placement import ExpertPlacement

# gemm(x_NI, w_EOI, num_tokens_per_expert_E) -> y_NO: row block e of x times w[e].T. The precision recipe may
# install another one on a GroupedExperts (FP8); the model itself never chooses one.
ExpertGemm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: `torch._grouped_mm`'s backward rejects
    expanded (stride-0) gradients such as the one `y.sum().backward()` produces."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def grouped_mm_supported(x_NI: torch.Tensor, w_EOI: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` takes these operands; others (odd tiny test widths, fp32 on CUDA) loop."""
    if not hasattr(torch, "_grouped_mm") or x_NI.dtype not in (torch.float32, torch.bfloat16):
        return False
    if x_NI.is_cuda and x_NI.dtype != torch.bfloat16:
        return False  # the CUDA kernel's documented dtype is bf16; not verified for fp32 yet
    if x_NI.dtype != torch.bfloat16 and torch.compiler.is_compiling():
        return False  # the op's meta (fake-tensor) kernel accepts bf16 only, so tracing fp32 would fail
    align = 16 // x_NI.element_size()  # 16-byte aligned strides
    return x_NI.dtype == w_EOI.dtype and w_EOI.shape[1] % align == 0 and w_EOI.shape[2] % align == 0


def grouped_mm(x_NI: torch.Tensor, w_EOI: torch.Tensor, num_tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """Row block e of `x_NI` (length `num_tokens_per_expert_E[e]`) times `w_EOI[e].T`; returns `y_NO`.

    `torch._grouped_mm` (CPU and Hopper GPUs in this torch, backward included, experts with zero rows too)
    with the offsets on the device, so nothing waits for the host; under autocast in the autocast dtype. Rows
    past the last offset are not computed (their output is unspecified). Operands the kernel does not take fall
    back to `looped_mm`.
    """
    device = x_NI.device.type
    if torch.is_autocast_enabled(device):
        # Autocast has no rule for this op on the CPU (it would run in fp32): cast as it casts a matmul's inputs.
        dtype = torch.get_autocast_dtype(device)
        x_NI, w_EOI = x_NI.to(dtype), w_EOI.to(dtype)
    if not grouped_mm_supported(x_NI, w_EOI):
        return looped_mm(x_NI, w_EOI, num_tokens_per_expert_E)
    offs_E = torch.cumsum(num_tokens_per_expert_E, dim=0, dtype=torch.int32)
    with torch.autocast(device, enabled=False):
        y_NO = torch._grouped_mm(x_NI.contiguous(), w_EOI.transpose(-2, -1), offs=offs_E)
    return _ContiguousGrad.apply(y_NO)


def looped_mm(x_NI: torch.Tensor, w_EOI: torch.Tensor, num_tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """The same product as `grouped_mm`, one matmul per expert: the test oracle, and the fallback. Reads the
    counts on the host (a device sync on a GPU). Rows past the last block come back as zeros."""
    counts = num_tokens_per_expert_E.tolist()
    tail = x_NI.shape[0] - sum(counts)
    chunks = torch.split(x_NI, [*counts, tail], dim=0)
    out = [chunk @ w_EOI[e].t() for e, chunk in enumerate(chunks[:-1])]
    out.append(x_NI.new_zeros(tail, w_EOI.shape[1]))
    return torch.cat(out, dim=0)


class GroupedExperts(nn.Module):
    """E SwiGLU experts: `y = (act(x W_gate[e]ᵀ) * (x W_up[e]ᵀ)) W_down[e]ᵀ` for the rows routed to expert e (act
    is silu unless configured: `train/model/mlp.py` ACTIVATIONS).

    Weights are stacked along a leading expert dimension. `placement` says which experts the stacks hold: all E
    as built (`ExpertPlacement.whole`); `parallel/` calls `shard` once, after which this rank holds the experts of
    `placement.local_range`, in that order, and `num_experts` is their count. `gemm` computes each projection; it
    defaults to `grouped_mm`.
    """

    EXPERT_WEIGHTS = ("w_gate_up_EHD", "w_down_EDF")

    def __init__(self, num_experts: int, d_model: int, hidden: int, act: str = "silu") -> None:
        super().__init__()
        self.placement = ExpertPlacement.whole(num_experts)
        self.hidden = hidden
        self.act = activation(act)
        self.gemm: ExpertGemm = grouped_mm
        self.w_gate_up_EHD = nn.Parameter(torch.empty(num_experts, 2 * hidden, d_model))
        self.w_down_EDF = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.reset_parameters()

    @property
    def num_experts(self) -> int:
        """Experts held in the stacks here (E/ep once sharded)."""
        return self.placement.num_local_experts

    def shard(self, placement: ExpertPlacement) -> None:
        """Keep only `placement.local_range` of the stacked experts. Before: the stacks hold all E experts
        (identical on every rank; on the meta device too). After: they hold experts [r·E/ep, (r+1)·E/ep) of
        `placement` as new Parameters (build the optimizer afterwards). Set once: a sharded module refuses."""
        if placement == self.placement:
            return
        if not self.placement.is_whole or placement.num_global_experts != self.placement.num_global_experts:
            raise ValueError(f"GroupedExperts holding {self.placement} cannot be resharded to {placement}")
        start, count = placement.local_start, placement.num_local_experts
        for name in self.EXPERT_WEIGHTS:
            full = getattr(self, name)
            local = nn.Parameter(full.detach()[start : start + count].clone(), requires_grad=full.requires_grad)
            setattr(self, name, local)
        self.placement = placement

    def reset_parameters(self, init_std: float = 0.02) -> None:
        """Draw every weight from normal(0, init_std), the framework-wide init."""
        for w in (self.w_gate_up_EHD, self.w_down_EDF):
            nn.init.normal_(w, mean=0.0, std=init_std)

    @torch.no_grad()
    def init_expert(self, i: int, std: float, generator_for: Callable[[str], torch.Generator]) -> None:
        """normal(0, std) for local expert i (global `placement.local_start + i`), one generator per logical
        weight (`generator_for(stream)`).

        The streams keep the names and (in, out) draw order of the earlier per-projection layout (`w_gate_EDF`,
        `w_up_EDF` (D, F), `w_down_EFD` (F, D)), so a seed gives the same weights as before this layout: the
        golden curves did not move with it."""
        F = self.hidden
        targets = (("w_gate_EDF", self.w_gate_up_EHD[i, :F]), ("w_up_EDF", self.w_gate_up_EHD[i, F:]),
                   ("w_down_EFD", self.w_down_EDF[i]))
        for stream, w_OI in targets:
            drawn_IO = torch.empty(w_OI.shape[1], w_OI.shape[0], dtype=w_OI.dtype, device=w_OI.device)
            w_OI.copy_(drawn_IO.normal_(0.0, std, generator=generator_for(stream)).t())

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_gate_up_EHD, w_down_EDF) as the GEMMs use them: the Parameters here; a precision recipe's subclass
        may hand out compute copies instead (`train/precision/bf16.py`)."""
        return self.w_gate_up_EHD, self.w_down_EDF

    def forward(self, x_ND: torch.Tensor, num_tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """`x_ND` rows grouped by expert ascending, block sizes `num_tokens_per_expert_E`; returns `y_ND`."""
        w_gate_up_EHD, w_down_EDF = self.expert_weights()
        gate_NF, up_NF = self.gemm(x_ND, w_gate_up_EHD, num_tokens_per_expert_E).chunk(2, dim=-1)
        return self.gemm(self.act(gate_NF) * up_NF, w_down_EDF, num_tokens_per_expert_E)


def stacked_expert_tensors(model: nn.Module) -> dict[str, GroupedExperts]:
    """Parameter name (as `model.named_parameters()` spells it) → the `GroupedExperts` holding it, for every stacked
    routed-expert weight of `model`. The module type is the marker: everything else is a dense tensor."""
    return {f"{prefix}.{name}" if prefix else name: module
            for prefix, module in model.named_modules() if isinstance(module, GroupedExperts)
            for name, _ in module.named_parameters(recurse=False)}
