"""RoPE settings: our `RopeConfig` ↔ transformers 5's `rope_parameters` dict, the same for every family.

transformers computes YaRN like DeepSeek's reference code except for the cos/sin factor when `mscale` or
`mscale_all_dim` is 0 or absent (it then uses yarn_get_mscale(factor)); both directions translate that case
exactly rather than assume the published configs' values.
"""
from __future__ import annotations

import math
from typing import Any, Optional

from train.hf.errors import HFConversionError

_YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")


def _yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def to_hf(rope: Any) -> dict:
    """`rope_parameters` for a transformers 5 config. YaRN's cos/sin factor is written out as
    `attention_factor` whenever transformers' own inference from mscale/mscale_all_dim would differ from
    DeepSeek's formula that our model uses (i.e. when either of them is 0)."""
    if rope.scaling is None:
        return {"rope_type": "default", "rope_theta": float(rope.theta)}
    s = rope.scaling
    if s.type != "yarn":
        raise HFConversionError(f"rope scaling type {s.type!r} cannot be exported (only 'yarn')")
    out = {"rope_type": "yarn", "rope_theta": float(rope.theta)}
    out.update({k: getattr(s, k) for k in _YARN_KEYS})
    if not (s.mscale and s.mscale_all_dim):
        out["attention_factor"] = _yarn_mscale(s.factor, s.mscale) / _yarn_mscale(s.factor, s.mscale_all_dim)
    return out


def from_hf(params: Optional[dict], theta: Optional[float] = None) -> tuple:
    """(theta, RopeScalingConfig | None) from a transformers `rope_parameters` (or legacy `rope_scaling`)
    dict, reproducing what transformers computes; rope types our model lacks are a clear error."""
    from train.config.model import RopeScalingConfig

    params = dict(params or {})
    theta = float(params.get("rope_theta", theta if theta is not None else 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "yarn":
        raise HFConversionError(f"rope type {kind!r} is not supported by moeforge (default and yarn are)")
    if params.get("truncate", True) is False:
        raise HFConversionError("yarn with truncate=false is not supported by moeforge")
    factor = float(params["factor"])
    mscale, mscale_all_dim = params.get("mscale"), float(params.get("mscale_all_dim") or 0.0)
    # The cos/sin factor transformers applies (its `_compute_yarn_parameters`), expressed through our
    # formula yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim) by solving for mscale;
    # mscale_all_dim is kept as given since MLA's softmax scale reads it directly.
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor, 1.0)
    if params.get("attention_factor") is None and mscale and mscale_all_dim:
        mscale = float(mscale)  # our formula is transformers' here: keep the published value exactly
    elif factor > 1:
        mscale = (float(attention_factor) * _yarn_mscale(factor, mscale_all_dim) - 1.0) / (0.1 * math.log(factor))
    elif abs(float(attention_factor) - 1.0) > 1e-9:
        raise HFConversionError(f"yarn attention_factor={attention_factor} with factor={factor} <= 1 "
                                "cannot be represented (moeforge applies no mscale without extension)")
    else:
        mscale = 1.0
    scaling = RopeScalingConfig(
        type="yarn", factor=factor,
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        beta_fast=float(params.get("beta_fast") or 32.0), beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=float(mscale), mscale_all_dim=mscale_all_dim)
    return theta, scaling
