"""Token capacity: cap what each expert, or each device, takes and drop the rest.

Shape legend: T tokens, K active routed experts per token, E routed experts, G devices (experts in contiguous
blocks of E/G per device, `ExpertPlacement(E, G)`), A = T*K flat assignments.

Per-expert capacity (`expert_capacity`, `drop_over_capacity`): priority is by token order: an expert keeps the
assignments of the earliest tokens (flat index t*K + k) and drops the later ones, as in GShard/Switch.

Per-device capacity (`device_capacity`, `drop_over_device_capacity`): DeepSeek-V2's token-dropping strategy
(section 2.2.4): a device's budget counts (token, device) copies, a token sent to a device once however many
of its experts live there, and the copies with the lowest affinity are dropped.

A dropped assignment gets id -1; the dispatcher gives it no row, so that slot contributes zero and the token
keeps only its other experts, the shared experts and the residual.
"""
from __future__ import annotations

import math

import torch

from train.model.moe.losses import token_device_mask
from train.model.moe.placement import ExpertPlacement


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


def device_capacity(topk_ids_TK: torch.Tensor, num_experts: int, num_devices: int, capacity_factor: float) -> int:
    """ceil(capacity_factor * C / G), C = the (token, device) copies of `topk_ids_TK` (ids of -1 ignored):
    `capacity_factor` times an even share of the copies over the G devices. Reads one count back to the host
    (the dispatcher syncs for its row count anyway)."""
    num_copies = int(token_device_mask(topk_ids_TK, num_experts, num_devices).sum())
    return math.ceil(capacity_factor * num_copies / num_devices)


def drop_over_device_capacity(
    topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor, num_experts: int, num_devices: int, capacity: int
) -> torch.Tensor:
    """`topk_ids_TK` with every (token, device) copy beyond its device's `capacity` set to -1, in all of that
    token's slots on that device.

    A device keeps the `capacity` copies of highest affinity (ties: earlier token first). The affinity of a
    copy is the SUM of the gate weights of the token's experts on that device: dropping the copy removes exactly
    that much gate mass from the token's output, so the dropped copies are those that contribute least (the max,
    V2's device score for device-limited routing, would rank a copy holding two experts at 0.3 below one holding
    a single expert at 0.4). With one expert per copy the two rules agree. Not differentiable (a selection).

    Under expert parallelism this runs on each rank over its OWN tokens, so a rank drops among the copies it
    sends, keeping at most its share of every device's budget (the layer computes `capacity` from the rank's own
    copies). Summed over the R ranks of the EP group, device g then receives at most
    Σ_r ceil(f·C_r / G) ≤ f·(Σ_r C_r)/G + R copies: capacity_factor times its even share of the group's copies
    (up to rounding), with no extra round of communication. DeepSeek-V2 drops on the receiving device instead,
    among all the copies it received: the same bound, a different choice of which tokens go.
    """
    T, _ = topk_ids_TK.shape
    G = num_devices
    valid_TK = topk_ids_TK >= 0
    device_TK = ExpertPlacement(num_experts, G).owner_of(topk_ids_TK, dropped=G)  # column G collects dropped slots
    w_TK = torch.where(valid_TK, topk_weights_TK.detach().float(), 0.0)
    affinity_TG = torch.zeros(T, G + 1, dtype=torch.float32, device=w_TK.device).scatter_add_(1, device_TK, w_TK)
    present_TG = torch.zeros(T, G + 1, dtype=torch.bool, device=w_TK.device).scatter_(1, device_TK, True)
    score_TG = torch.where(present_TG, affinity_TG, -math.inf)[:, :G]
    # rank of each copy within its device: 0 = highest affinity; the stable sort keeps token order among ties
    order_TG = torch.sort(score_TG, dim=0, descending=True, stable=True).indices
    ranks_T1 = torch.arange(T, device=w_TK.device).unsqueeze(1).expand(T, G)
    rank_TG = torch.empty_like(order_TG).scatter_(0, order_TG, ranks_T1)
    keep_TG = present_TG[:, :G] & (rank_TG < capacity)
    keep_TG1 = torch.cat([keep_TG, keep_TG.new_zeros(T, 1)], dim=1)
    return torch.where(keep_TG1.gather(1, device_TK), topk_ids_TK, -1)
