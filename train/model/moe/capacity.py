"""Token capacity: cap the assignments each expert takes and drop the rest.

Shape legend: T tokens, K active routed experts per token, E routed experts, A = T*K flat assignments.

Priority is by token order: an expert keeps the assignments of the earliest tokens (flat index t*K + k) and
drops the later ones, as in GShard/Switch. A dropped assignment gets id -1; the dispatcher gives it no row, so
that slot contributes zero and the token keeps only its other experts, the shared experts and the residual.
"""
from __future__ import annotations

import math

import torch


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """ceil(capacity_factor * T * K / E): `capacity_factor` times an even share of the layer's assignments."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def drop_over_capacity(topk_ids_TK: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """`topk_ids_TK` with every assignment beyond its expert's first `capacity` (in token order) set to -1."""
    ids_A = topk_ids_TK.reshape(-1)
    keys_A = torch.where(ids_A >= 0, ids_A, num_experts)
    sorted_keys_A, perm_A = torch.sort(keys_A, stable=True)  # stable: token order within each expert
    counts_E1 = torch.zeros(num_experts + 1, dtype=torch.long, device=ids_A.device)
    counts_E1.scatter_add_(0, keys_A, torch.ones_like(keys_A))
    starts_E1 = torch.cumsum(counts_E1, dim=0) - counts_E1
    rank_sorted_A = torch.arange(ids_A.numel(), device=ids_A.device) - starts_E1[sorted_keys_A]
    rank_A = torch.empty_like(rank_sorted_A).scatter_(0, perm_A, rank_sorted_A)
    keep_A = (rank_A < capacity) & (ids_A >= 0)
    return torch.where(keep_A, ids_A, -1).view_as(topk_ids_TK)
