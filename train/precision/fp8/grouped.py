"""The FP8 routed-expert GEMM installed as `GroupedExperts.gemm`: `gemm(x_NI, w_EOI, num_tokens_per_expert_E) -> y_NO`.

Shape legend: N rows grouped by expert ascending, I input features, O output features, E (local) experts;
`w_EOI` is in nn.Linear's (out, in) layout per expert.

Kernel per device and recipe (`Fp8GroupedGemm.kernel` names the one chosen):
- CUDA sm90+, tensorwise or rowwise: torchao's `_to_fp8_rowwise_then_scaled_grouped_mm` (torchao has no
  tensorwise grouped GEMM; its rowwise one, power-of-2 scales, e4m3 throughout, serves both). Its B_t operand
  is `w_EOI.transpose(-2, -1)`, per-expert column-major without a copy. It needs every group's row count to be
  a multiple of 16: `pad_groups` inserts zero rows (differentiably) and the result is gathered back.
- CUDA sm90+, blockwise: torchao's `_to_fp8_blockwise_then_scaled_grouped_mm` (1x128 / 128x128, it pads
  groups itself) when it imports and I and O are multiples of 128, else the emulation.
- everywhere else (CPU): `emulated.emulated_fp8_grouped_mm` with the recipe's own granularity.
The CUDA branches are written against torchao 0.18's signatures but were not run here (no GPU on the machine
this was written on); the emulated one is what the tests exercise.
"""
from __future__ import annotations

import torch

from train.config import Fp8Recipe
from train.precision.fp8.emulated import emulated_fp8_grouped_mm, output_dtype

GROUP_ALIGN = 16  # torch._scaled_grouped_mm: every group's rows a multiple of 16


def is_sm90(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def pad_groups(x_NI: torch.Tensor, num_tokens_per_expert_E: torch.Tensor, align: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copy each expert's row block of `x_NI` to the start of a block padded with zero rows to a multiple of
    `align`; rows past the last block (if a caller passes any) go after the padded blocks, outside
    every group. Returns `(x_PI, rows_N, padded_counts_E)` with `x_PI[rows_N] == x_NI`. `index_copy` and the
    later `index_select(0, rows_N)` are differentiable, so the padding sits outside the FP8 kernel's autograd.
    Sizes are read on the host (one sync)."""
    counts = num_tokens_per_expert_E.to(torch.int64)
    padded = (counts + align - 1) // align * align
    total, padded_total = (int(v) for v in torch.stack([counts.sum(), padded.sum()]).tolist())
    starts = torch.cumsum(counts, 0) - counts
    padded_starts = torch.cumsum(padded, 0) - padded
    shift = torch.repeat_interleave(padded_starts - starts, counts, output_size=total)
    rows_N = torch.cat([torch.arange(total, device=x_NI.device) + shift,
                        torch.arange(padded_total, padded_total + x_NI.shape[0] - total, device=x_NI.device)])
    x_PI = x_NI.new_zeros(padded_total + x_NI.shape[0] - total, x_NI.shape[1]).index_copy(0, rows_N, x_NI)
    return x_PI, rows_N, padded


def _torchao_rowwise(x_NI, w_EOI, num_tokens_per_expert_E):
    from torchao.prototype.moe_training.fp8_grouped_mm import _to_fp8_rowwise_then_scaled_grouped_mm

    x_PI, rows_N, padded_E = pad_groups(x_NI, num_tokens_per_expert_E, GROUP_ALIGN)
    offs_E = torch.cumsum(padded_E, 0).to(torch.int32)
    y_PO = _to_fp8_rowwise_then_scaled_grouped_mm(x_PI, w_EOI.transpose(-2, -1), offs_E,
                                                  out_dtype=output_dtype(x_NI), pad_token_groups_for_grouped_mm=False)
    return y_PO.index_select(0, rows_N)


def _torchao_blockwise(x_NI, w_EOI, num_tokens_per_expert_E):
    from torchao.prototype.moe_training.blockwise_fp8.grouped_mm import _to_fp8_blockwise_then_scaled_grouped_mm

    offs_E = torch.cumsum(num_tokens_per_expert_E, 0).to(torch.int32)
    return _to_fp8_blockwise_then_scaled_grouped_mm(x_NI.contiguous(), w_EOI.transpose(-2, -1), offs_E,
                                                    out_dtype=output_dtype(x_NI))


def _torchao_blockwise_imports() -> bool:
    try:
        import torchao.prototype.moe_training.blockwise_fp8.grouped_mm  # noqa: F401
    except Exception:  # triton or deep_gemm missing, or a kernel that fails to build
        return False
    return True


class Fp8GroupedGemm:
    """Callable FP8 grouped GEMM for one recipe on one device (a plain object, so `copy.deepcopy` of a model
    copies it). The kernel is chosen per call where it depends on the weight's dims."""

    def __init__(self, recipe: Fp8Recipe, device: torch.device):
        self.recipe = recipe
        sm90 = is_sm90(torch.device(device))
        self._cuda_rowwise = sm90 and recipe in (Fp8Recipe.tensorwise, Fp8Recipe.rowwise)
        self._cuda_blockwise = sm90 and recipe is Fp8Recipe.blockwise and _torchao_blockwise_imports()

    @property
    def kernel(self) -> str:
        if self._cuda_rowwise:
            return "torchao rowwise grouped gemm (torch._scaled_grouped_mm)"
        if self._cuda_blockwise:
            return "torchao blockwise grouped gemm (emulated where I or O is not a multiple of 128)"
        return f"emulated {self.recipe.value} grouped gemm"

    def __call__(self, x_NI: torch.Tensor, w_EOI: torch.Tensor, num_tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        if self._cuda_rowwise:
            return _torchao_rowwise(x_NI, w_EOI, num_tokens_per_expert_E)
        if self._cuda_blockwise and w_EOI.shape[1] % 128 == 0 and w_EOI.shape[2] % 128 == 0:
            return _torchao_blockwise(x_NI, w_EOI, num_tokens_per_expert_E)
        return emulated_fp8_grouped_mm(x_NI, w_EOI, num_tokens_per_expert_E, self.recipe)
