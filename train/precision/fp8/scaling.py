"""Dynamic FP8 scaling at any block granularity, following torchao's conventions, for the emulated kernels.

One function covers every granularity the recipes use: a scale per `(rows, cols)` block of the last two dims
(`None` = the whole dim), so a tensor-wide scale is `(None, None)`, torchao's rowwise scale `(1, None)`, a
column's `(None, 1)`, DeepSeek-V3's activation tile `(1, 128)` and its weight block `(128, 128)`. A leading dim
(experts) is batched: every expert gets its own blocks. Edge blocks may be partial (dims not multiples of 128).

Scale convention (torchao `amax_to_scale`, shared by its tensorwise/rowwise casts and its blockwise triton
kernels): `scale = finfo(dtype).max / clamp(amax, min=1e-12)` computed in float64 then float32, optionally
rounded down to a power of two (torchao's rowwise recipe); `q = saturate(x.float() * scale).to(dtype)`;
the dequantised value is `q.float() / scale`. Dequantising and multiplying in fp32 equals a scaled GEMM with
fp32 accumulation up to summation order.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
EPS = 1e-12  # torchao.float8.float8_utils.EPS: no division by zero for an all-zero block

Block = Tuple[Optional[int], Optional[int]]


def amax_to_scale(amax: torch.Tensor, dtype: torch.dtype, pow2: bool = False) -> torch.Tensor:
    """`finfo(dtype).max / amax` in float32 (float64 division, as torchao does so eager and compiled agree),
    rounded down to a power of two when `pow2`."""
    scale = (torch.finfo(dtype).max / torch.clamp(amax.to(torch.float64), min=EPS)).to(torch.float32)
    if pow2:
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    return scale


@torch.no_grad()
def quantize_blocks(t: torch.Tensor, block: Block, dtype: torch.dtype = E4M3, pow2: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise `t` (2-D, or 3-D with a leading batch dim) to `dtype` with one scale per `block` of its last
    two dims; returns `(dequantised fp32 tensor shaped like t, scales)` where scales has one entry per block:
    shape `(..., ceil(M/bm), ceil(K/bk))`."""
    squeeze = t.dim() == 2
    x = t.float().unsqueeze(0) if squeeze else t.float()
    B, M, K = x.shape
    bm, bk = block[0] or M, block[1] or K
    bm, bk = max(1, min(bm, M)), max(1, min(bk, K))
    nm, nk = -(-M // bm), -(-K // bk)
    pad = (0, nk * bk - K, 0, nm * bm - M)
    xp = torch.nn.functional.pad(x, pad) if any(pad) else x  # zeros never raise a block's amax
    tiles = xp.view(B, nm, bm, nk, bk)
    scale = amax_to_scale(tiles.abs().amax(dim=(2, 4), keepdim=True), dtype, pow2)
    fmax = torch.finfo(dtype).max
    q = (tiles * scale).clamp(-fmax, fmax).to(dtype)
    dq = (q.float() / scale).view(B, nm * bm, nk * bk)[:, :M, :K]
    scales = scale.view(B, nm, nk)
    return (dq[0], scales[0]) if squeeze else (dq, scales)
