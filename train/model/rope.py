"""Rotary position embeddings, with DeepSeek's YaRN context extension.

Tables are kept at half width: `cos_TP`, `sin_TP` with P = rotary_dim / 2 rotated pairs, one angle each. Two
pair layouts exist in published checkpoints and `apply_rotary` handles both:
- halves (`interleaved=False`, Llama/Mixtral/DBRX): pair r is channels (r, r + P), i.e. `rotate_half`;
- adjacent (`interleaved=True`, DeepSeek): pair r is channels (2r, 2r + 1). HF DeepseekV2 multiplies complex
  numbers built from adjacent pairs; HF DeepseekV3 rotates the even/odd slices and concatenates them (it
  returns the pairs de-interleaved). Both rotate the same pairs by the same angles; we keep the input layout,
  which equals V2's output and is a fixed permutation of V3's, and q·k is identical in all three.

YaRN follows DeepSeek's reference code (which HF's `_compute_yarn_parameters` reproduces when `truncate` is
left at its default and both `mscale` and `mscale_all_dim` are non-zero):
- correction range from `beta_fast`/`beta_slow` rotations over `original_max_position_embeddings`, floored and
  ceiled, clamped to [0, rotary_dim - 1];
- inv_freq = interp · (1 - mask) + extrap · mask with mask = 1 - linear ramp over the pair index;
- cos and sin multiplied by yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim).
  (HF differs only when `mscale_all_dim` is 0: it then uses yarn_get_mscale(factor) and ignores `mscale`;
  DeepSeek's formula, used here, gives yarn_get_mscale(factor, mscale).)
MLA additionally multiplies its softmax scale by yarn_get_mscale(factor, mscale_all_dim)² (`softmax_mscale`).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from train.config.model import RopeConfig, RopeScalingConfig


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction 0.1·mscale·ln(scale) + 1 (1 when not extending)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_find_correction_dim(num_rotations: float, dim: int, base: float, max_position: int) -> float:
    """The (fractional) channel index whose wavelength fits `num_rotations` times into `max_position`."""
    return (dim * math.log(max_position / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def yarn_find_correction_range(
    low_rot: float, high_rot: float, dim: int, base: float, max_position: int
) -> tuple[int, int]:
    """Integer pair-index range [low, high] over which YaRN blends interpolation into extrapolation."""
    low = math.floor(yarn_find_correction_dim(low_rot, dim, base, max_position))
    high = math.ceil(yarn_find_correction_dim(high_rot, dim, base, max_position))
    return max(low, 0), min(high, dim - 1)


def yarn_linear_ramp_mask(low: float, high: float, num: int) -> torch.Tensor:
    """0 below `low`, 1 above `high`, linear in between, over indices 0..num-1 (fp32)."""
    if low == high:
        high += 0.001  # avoid dividing by zero, as the reference does
    ramp = (torch.arange(num, dtype=torch.float32) - low) / (high - low)
    return torch.clamp(ramp, 0, 1)


def rope_inv_freq(dim: int, theta: float, scaling: Optional[RopeScalingConfig]) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (dim/2,) in fp32 on the CPU and the factor cos/sin are multiplied by."""
    exponent = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    if scaling is None:
        return 1.0 / (theta**exponent), 1.0
    if scaling.type != "yarn":
        raise ValueError(f"unsupported rope scaling type {scaling.type!r} (only 'yarn')")
    pos_freqs = theta**exponent
    freq_extra = 1.0 / pos_freqs
    freq_inter = 1.0 / (scaling.factor * pos_freqs)
    low, high = yarn_find_correction_range(
        scaling.beta_fast, scaling.beta_slow, dim, theta, scaling.original_max_position_embeddings
    )
    extra_mask = 1.0 - yarn_linear_ramp_mask(low, high, dim // 2)
    inv_freq = freq_inter * (1 - extra_mask) + freq_extra * extra_mask
    mscale = yarn_get_mscale(scaling.factor, scaling.mscale) / yarn_get_mscale(
        scaling.factor, scaling.mscale_all_dim
    )
    return inv_freq, float(mscale)


def softmax_mscale(scaling: Optional[RopeScalingConfig]) -> float:
    """Multiplier of MLA's softmax scale: yarn_get_mscale(factor, mscale_all_dim)² (1 without scaling)."""
    if scaling is None or not scaling.mscale_all_dim:
        return 1.0
    m = yarn_get_mscale(scaling.factor, scaling.mscale_all_dim)
    return m * m


class RotaryEmbedding(nn.Module):
    """Holds `inv_freq` (non-persistent: derived from the config, never checkpointed) and turns positions
    into half-width `cos_TP`, `sin_TP` tables, already multiplied by the YaRN mscale. Positions (T,) shared by
    the batch give (T, R) tables; per-row positions (B, T) (document masking) give (B, T, R)."""

    def __init__(self, dim: int, rope: RopeConfig):
        super().__init__()
        self.dim = dim
        self.rope = rope
        inv_freq, self.mscale = rope_inv_freq(dim, rope.theta, rope.scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Recompute the table, e.g. after `to_empty()` from the meta device left it uninitialised."""
        inv_freq, self.mscale = rope_inv_freq(self.dim, self.rope.theta, self.rope.scaling)
        self.inv_freq.copy_(inv_freq.to(self.inv_freq.device))

    @torch.no_grad()
    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Angles in fp32 whatever autocast says: positions up to 1e5+ times small frequencies need the mantissa.
        freqs_TP = positions.float()[..., None] * self.inv_freq.float()
        return freqs_TP.cos() * self.mscale, freqs_TP.sin() * self.mscale


def apply_rotary(x: torch.Tensor, cos_TP: torch.Tensor, sin_TP: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate the last dim of `x` (..., T, 2R) by the angles in the half-width tables, in fp32, keeping the
    input's channel layout. `interleaved` selects adjacent pairs (DeepSeek) over halves (Llama).

    Tables of per-row positions (B, T, R) apply to `x` laid out (B, heads, T, 2R): they broadcast over heads.
    """
    if cos_TP.dim() == 3:
        cos_TP, sin_TP = cos_TP[:, None], sin_TP[:, None]
    x32 = x.float()
    if interleaved:
        x1, x2 = x32[..., 0::2], x32[..., 1::2]
    else:
        x1, x2 = x32.chunk(2, dim=-1)
    y1 = x1 * cos_TP - x2 * sin_TP
    y2 = x2 * cos_TP + x1 * sin_TP
    y = torch.stack((y1, y2), dim=-1).flatten(-2) if interleaved else torch.cat((y1, y2), dim=-1)
    return y.to(x.dtype)
