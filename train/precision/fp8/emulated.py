"""Emulated FP8 GEMMs: quantise to float8 with a recipe's scales, dequantise, multiply in fp32.

Shape legend: N rows (token copies, grouped by expert in ascending order), I input features, O output
features, E experts (a dense linear is E = 1 with every row in its group).

What each recipe quantises (every choice follows torchao, so the emulation exercises the scaling the GPU
kernels use; `scaling.quantize_blocks` computes the scales):

| GEMM | operand | tensorwise | rowwise (pow-2 scales) | blockwise (DeepSeek-V3) |
| --- | --- | --- | --- | --- |
| forward `y = x w[e]^T` | x | one scale, e4m3 | per row, e4m3 | 1x128 tiles, e4m3 |
| | w[e] | one per expert, e4m3 | per output row, e4m3 | 128x128 blocks, e4m3 |
| dgrad `gx = gy w[e]` | gy | one scale, **e5m2** | per row, e4m3 | 1x128 tiles, e4m3 |
| | w[e] | one per expert, e4m3 | per input column, e4m3 | 128x128 blocks, e4m3 |
| wgrad `gw[e] = gy_e^T x_e` | gy_e | gy's dgrad cast, e5m2 | per column of the group, e4m3 | 128x1 tiles in the group, e4m3 |
| | x_e | x's forward cast, e4m3 | per column of the group, e4m3 | 128x1 tiles in the group, e4m3 |

(`Float8LinearConfig.from_recipe_name("tensorwise"/"rowwise")`, torchao's rowwise grouped GEMM and its
blockwise linear/grouped GEMM.) Group boundaries bound the wgrad tiles, as torchao's grouped kernels do after
padding each group to the tile size. Products accumulate in fp32 with autocast off (rowwise rounds each product to bf16 first, as torchao's rowwise
`_scaled_mm` outputs bf16 whatever the input dtype); `y` comes back in the
autocast dtype when autocast is on (as torchao's kernels return bf16), else in x's dtype; `gx` in x's dtype,
`gw` in w's dtype (fp32 master weights). Only x and w are saved for backward (re-quantised there).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from train.config import Fp8Recipe
from train.precision.fp8.scaling import E4M3, E5M2, Block, quantize_blocks

WHOLE: Block = (None, None)
ROW: Block = (1, None)
COLUMN: Block = (None, 1)


@dataclass(frozen=True)
class EmulatedRecipe:
    """The blocks and dtypes of one recipe (the table in this module's docstring)."""

    x: Block
    w: Block
    grad: Block
    grad_dtype: torch.dtype
    w_dgrad: Block
    wgrad_grad: Optional[Block]  # None: reuse the dgrad cast of gy and the forward cast of x (tensorwise)
    wgrad_x: Optional[Block]
    pow2: bool
    bf16_products: bool = False  # rowwise: torchao's rowwise scaled GEMM writes bf16 even for fp32 inputs


def _product(t: torch.Tensor, spec: EmulatedRecipe, dtype: torch.dtype) -> torch.Tensor:
    return (t.to(torch.bfloat16) if spec.bf16_products else t).to(dtype)


EMULATED_RECIPES = {
    Fp8Recipe.tensorwise: EmulatedRecipe(x=WHOLE, w=WHOLE, grad=WHOLE, grad_dtype=E5M2, w_dgrad=WHOLE,
                                         wgrad_grad=None, wgrad_x=None, pow2=False),
    Fp8Recipe.rowwise: EmulatedRecipe(x=ROW, w=ROW, grad=ROW, grad_dtype=E4M3, w_dgrad=COLUMN,
                                      wgrad_grad=COLUMN, wgrad_x=COLUMN, pow2=True, bf16_products=True),
    Fp8Recipe.blockwise: EmulatedRecipe(x=(1, 128), w=(128, 128), grad=(1, 128), grad_dtype=E4M3,
                                        w_dgrad=(128, 128), wgrad_grad=(128, 1), wgrad_x=(128, 1), pow2=False),
}


def _per_group(a_NI: torch.Tensor, b_EKI: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Row block e of `a_NI` times `b_EKI[e]^T` (fp32)."""
    chunks = torch.split(a_NI, list(counts), dim=0)
    out = [chunk @ b_EKI[e].transpose(0, 1) for e, chunk in enumerate(chunks)]
    return torch.cat(out, dim=0) if out else a_NI.new_zeros(0, b_EKI.shape[1])


class _EmulatedFp8GroupedGemm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_NI, w_EOI, counts, spec: EmulatedRecipe, out_dtype):
        ctx.save_for_backward(x_NI, w_EOI)
        ctx.counts, ctx.spec = counts, spec
        with torch.autocast(device_type=x_NI.device.type, enabled=False):
            xq_NI, _ = quantize_blocks(x_NI, spec.x, E4M3, spec.pow2)
            wq_EOI, _ = quantize_blocks(w_EOI, spec.w, E4M3, spec.pow2)
            return _product(_per_group(xq_NI, wq_EOI, counts), spec, out_dtype)

    @staticmethod
    def backward(ctx, gy_NO):
        x_NI, w_EOI = ctx.saved_tensors
        counts, spec = ctx.counts, ctx.spec
        with torch.autocast(device_type=gy_NO.device.type, enabled=False):
            gyq_NO, _ = quantize_blocks(gy_NO, spec.grad, spec.grad_dtype, spec.pow2)
            wq_EOI, _ = quantize_blocks(w_EOI, spec.w_dgrad, E4M3, spec.pow2)
            gx_NI = _per_group(gyq_NO, wq_EOI.transpose(1, 2), counts)
            if spec.wgrad_grad is None:
                gy_groups = torch.split(gyq_NO, list(counts), dim=0)
                x_groups = torch.split(quantize_blocks(x_NI, spec.x, E4M3, spec.pow2)[0], list(counts), dim=0)
            else:
                gy_groups = [quantize_blocks(g, spec.wgrad_grad, spec.grad_dtype, spec.pow2)[0]
                             for g in torch.split(gy_NO, list(counts), dim=0)]
                x_groups = [quantize_blocks(x, spec.wgrad_x, E4M3, spec.pow2)[0]
                            for x in torch.split(x_NI, list(counts), dim=0)]
            gw_EOI = torch.stack([g.transpose(0, 1) @ x for g, x in zip(gy_groups, x_groups)])
        return _product(gx_NI, spec, x_NI.dtype), _product(gw_EOI, spec, w_EOI.dtype), None, None, None


def output_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype an FP8 GEMM returns: the autocast dtype under autocast, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def emulated_fp8_grouped_mm(x_NI: torch.Tensor, w_EOI: torch.Tensor, num_tokens_per_expert_E: torch.Tensor,
                            recipe: Fp8Recipe) -> torch.Tensor:
    """`y_NO`: row block e of `x_NI` times `w_EOI[e]^T`, with x, w (and in backward the gradients) quantised to
    FP8 as `recipe` says, dequantised, and multiplied in fp32. Rows past the last block come back as zeros.
    Reads the counts on the host (a device sync on a GPU, where this is only the fallback)."""
    counts = [int(c) for c in num_tokens_per_expert_E.tolist()]
    total, spec, dtype = sum(counts), EMULATED_RECIPES[recipe], output_dtype(x_NI)
    if total == x_NI.shape[0]:
        return _EmulatedFp8GroupedGemm.apply(x_NI, w_EOI, counts, spec, dtype)
    # rows past the last group (if a caller passes any) are not computed, as in
    # `grouped_mm`, and do not enter any scale
    y = _EmulatedFp8GroupedGemm.apply(x_NI[:total], w_EOI, counts, spec, dtype)
    return torch.cat([y, y.new_zeros(x_NI.shape[0] - total, w_EOI.shape[1])])


class EmulatedFp8Linear(torch.nn.Linear):
    """`nn.Linear` whose GEMM is `emulated_fp8_grouped_mm` with one group (the blockwise recipe off CUDA).
    Holds the converted linear's own weight and bias Parameters, so names and state-dict keys do not change."""

    recipe: Fp8Recipe

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, recipe: Fp8Recipe) -> "EmulatedFp8Linear":
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=False)
        new.weight, new.bias, new.recipe = linear.weight, linear.bias, recipe
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_NI = x.reshape(-1, x.shape[-1])
        counts = torch.tensor([x_NI.shape[0]])
        y = emulated_fp8_grouped_mm(x_NI, self.weight.unsqueeze(0), counts, self.recipe)
        y = y.reshape(*x.shape[:-1], y.shape[-1])
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8={self.recipe.value} (emulated)"
