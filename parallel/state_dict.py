"""Logical (unsharded) state dicts of an expert-parallel model, for checkpoints in the repo's format.

Keys and shapes are those of the unsharded model's `state_dict()`: the stacked expert weights of a layer are
the concatenation, in EP-rank order, of the slices held by the ranks of one EP group (each rank's slice is the
`local_range` of its experts' `ExpertPlacement`, and the ranges tile [0, E) in that order).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from parallel.mesh import Mesh
from train.model.moe.experts import stacked_expert_tensors


@torch.no_grad()
def gather_full_state_dict(model: nn.Module, mesh: Mesh) -> dict[str, torch.Tensor]:
    """Before: each rank holds its expert slices (all EP groups hold the same experts). After: rank 0 returns
    the logical state dict (CPU tensors, every expert, keys identical to the unsharded model); other ranks
    return {}. Collective over EP group 0 (ranks 0..ep_size-1); other ranks return at once."""
    sd = model.state_dict()
    if mesh.rank != 0 and (mesh.ep_size == 1 or mesh.edp_rank != 0):
        return {}
    out = {}
    expert_keys = stacked_expert_tensors(model) if mesh.ep_size > 1 else {}
    for key, value in sd.items():
        if key in expert_keys:
            parts = [torch.empty_like(value) for _ in range(mesh.ep_size)]
            dist.all_gather(parts, value.contiguous(), group=mesh.ep_group)
            value = torch.cat(parts, dim=0)
        if mesh.rank == 0:
            out[key] = value.detach().cpu().clone()
    return out


@torch.no_grad()
def load_full_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], mesh: Mesh):
    """Before: every rank holds the logical state dict (e.g. read from `model.safetensors`). After: the model
    holds it, each rank keeping only its own expert slices. Strict: missing or unexpected keys raise."""
    local = dict(state_dict)
    for key, experts in stacked_expert_tensors(model).items():
        placement = experts.placement
        full = state_dict[key] if key in state_dict else None
        if full is None:
            continue  # load_state_dict reports it as missing
        if full.shape[0] != placement.num_global_experts:
            raise ValueError(f"{key}: checkpoint has {full.shape[0]} experts, the model {placement.num_global_experts}")
        local[key] = full[placement.local_start : placement.local_start + placement.num_local_experts]
    return model.load_state_dict(local, strict=True)
