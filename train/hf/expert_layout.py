"""Expert tensor layouts: our stacked experts, the converters' per-projection (E, in, out) view, per-expert
`nn.Linear` weights, and transformers 5's fused gate_up tensors.

Shape legend: E experts, D model dim, F expert hidden, H = 2F (gate and up rows), I/O a Linear's in/out.
"""
from __future__ import annotations

from typing import List

import torch

from train.hf.weights import StateDict


def split_experts(sd: StateDict) -> StateDict:
    """Our stacked experts (`experts.w_gate_up_EHD` (E, 2F, D), `experts.w_down_EDF` (E, D, F), Linear layout)
    as the per-projection (E, in, out) tensors the family converters map: `experts.w_gate_EDF`,
    `experts.w_up_EDF` (E, D, F) and `experts.w_down_EFD` (E, F, D). Views, no copies; other keys pass."""
    out: StateDict = {}
    for k, v in sd.items():
        if k.endswith("experts.w_gate_up_EHD"):
            base, f = k[: -len("w_gate_up_EHD")], v.shape[1] // 2
            out[base + "w_gate_EDF"], out[base + "w_up_EDF"] = v[:, :f].transpose(1, 2), v[:, f:].transpose(1, 2)
        elif k.endswith("experts.w_down_EDF"):
            out[k[: -len("w_down_EDF")] + "w_down_EFD"] = v.transpose(1, 2)
        else:
            out[k] = v
    return out


def fuse_experts(sd: StateDict) -> StateDict:
    """Inverse of `split_experts`: the converters' per-projection tensors as our stacked experts."""
    out: StateDict = {}
    for k, v in sd.items():
        if k.endswith("experts.w_gate_EDF"):
            base = k[: -len("w_gate_EDF")]
            up = sd[base + "w_up_EDF"]
            out[base + "w_gate_up_EHD"] = torch.cat([v, up], dim=2).transpose(1, 2).contiguous()
        elif k.endswith("experts.w_down_EFD"):
            out[k[: -len("w_down_EFD")] + "w_down_EDF"] = v.transpose(1, 2).contiguous()
        elif not k.endswith("experts.w_up_EDF"):
            out[k] = v
    return out


def experts_to_linears(w_EIO: torch.Tensor) -> List[torch.Tensor]:
    """Stacked (E, in, out) → E `nn.Linear` weights (out, in)."""
    return [w.t().contiguous() for w in w_EIO.unbind(0)]


def experts_from_linears(weights: List[torch.Tensor]) -> torch.Tensor:
    """E `nn.Linear` weights (out, in) → stacked (E, in, out)."""
    return torch.stack([w.t() for w in weights]).contiguous()


def unfuse_experts(hf: StateDict, prefix: str, gate: str, up: str, down: str) -> StateDict:
    """transformers 5 stores experts fused: `{prefix[:-1]}.gate_up_proj` (E, 2F, D), gate rows first, and
    `.down_proj` (E, D, F). Rewrite them as the published per-expert Linear layout
    `{prefix}{j}.{gate|up|down}.weight`; other keys pass through."""
    out: StateDict = {}
    fused = prefix.rstrip(".")
    for k, v in hf.items():
        if k.endswith(fused + ".gate_up_proj"):
            base = k[: -len("gate_up_proj")]
            f = v.shape[1] // 2
            for j in range(v.shape[0]):
                out[f"{base}{j}.{gate}.weight"] = v[j, :f]
                out[f"{base}{j}.{up}.weight"] = v[j, f:]
        elif k.endswith(fused + ".down_proj"):
            base = k[: -len("down_proj")]
            for j in range(v.shape[0]):
                out[f"{base}{j}.{down}.weight"] = v[j]
        else:
            out[k] = v
    return out
