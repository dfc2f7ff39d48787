"""Load-balance terms and their count statistics, as pure functions (coefficients are applied by the layer).

Shape legend: B sequences, T tokens, E routed experts (N' in the papers), K active routed experts (K'),
G devices (D in the papers; contiguous blocks of E/G experts: `ExpertPlacement(E, G)` says which).

Definitions follow DeepSeek-V2 (arXiv 2405.04434, sec. 2.2.3) and DeepSeek-V3 (arXiv 2412.19437, eq. 17-20).
Counts (the f terms) are non-differentiable and may cover the whole batch of all ranks (`num_tokens` is then
the global token count); the probability terms P are differentiable and local to this rank's tokens.
"""
from __future__ import annotations

from typing import Optional

import torch

from train.model.moe.placement import ExpertPlacement


def balance_probs(scores_TE: torch.Tensor, scoring: str) -> torch.Tensor:
    """The s_{i,t} of the balance terms: softmax probabilities as they are; sigmoid scores normalised per token
    to sum to one (V3 eq. 19)."""
    if scoring == "sigmoid":
        return scores_TE / scores_TE.sum(dim=-1, keepdim=True)
    return scores_TE


@torch.no_grad()
def expert_counts(topk_ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Number of tokens that select each expert (fp32, `_E`); ids of -1 are ignored."""
    ids_A = topk_ids_TK.reshape(-1)
    counts_E1 = torch.zeros(num_experts + 1, dtype=torch.float32, device=ids_A.device)
    ones_A = torch.ones_like(ids_A, dtype=torch.float32)
    counts_E1.scatter_add_(0, torch.where(ids_A >= 0, ids_A, num_experts), ones_A)
    return counts_E1[:num_experts]


@torch.no_grad()
def token_device_mask(topk_ids_TK: torch.Tensor, num_experts: int, num_devices: int) -> torch.Tensor:
    """Boolean `_TG`: whether token t has an expert on device g (experts in contiguous blocks per device)."""
    T = topk_ids_TK.shape[0]
    valid_TK = topk_ids_TK >= 0
    device_TK = ExpertPlacement(num_experts, num_devices).owner_of(topk_ids_TK, dropped=0)
    mask_TG = torch.zeros(T, num_devices, dtype=torch.float32, device=topk_ids_TK.device)
    mask_TG.scatter_add_(1, device_TK, valid_TK.float())
    return mask_TG > 0


def expert_balance_loss(
    num_tokens_per_expert_E: torch.Tensor, probs_TE: torch.Tensor, num_tokens: float, top_k: int
) -> torch.Tensor:
    """sum_i f_i P_i with f_i = E/(K T) * count_i and P_i = mean_t s_{i,t} (DeepSeek-V2 eq. 12-14)."""
    E = probs_TE.shape[-1]
    f_E = num_tokens_per_expert_E * (E / (top_k * num_tokens))
    return (f_E * probs_TE.mean(dim=0)).sum()


def device_balance_loss(
    num_tokens_per_expert_E: torch.Tensor, probs_TE: torch.Tensor, num_tokens: float, top_k: int, num_devices: int
) -> torch.Tensor:
    """sum_d f'_d P'_d: f'_d = mean of f_j over device d's experts, P'_d = sum of their P_j (V2 eq. 15-17)."""
    E = probs_TE.shape[-1]
    f_GE = (num_tokens_per_expert_E * (E / (top_k * num_tokens))).view(num_devices, -1)
    p_GE = probs_TE.mean(dim=0).view(num_devices, -1)
    return (f_GE.mean(dim=-1) * p_GE.sum(dim=-1)).sum()


def max_devices_per_token(num_experts: int, num_devices: int, routing_groups: Optional[int],
                          device_limit: Optional[int]) -> int:
    """The most of the `num_devices` devices (contiguous blocks of E/G experts) one token can reach when it may
    use `device_limit` of `routing_groups` contiguous expert blocks: M times the most devices one block spans, at
    most G. G without a limit; exactly M when the routing groups are the devices."""
    if device_limit is None or routing_groups is None:
        return num_devices
    devices, per_group = ExpertPlacement(num_experts, num_devices), num_experts // routing_groups
    span = max(devices.owner(g * per_group + per_group - 1) - devices.owner(g * per_group) + 1
               for g in range(routing_groups))
    return min(num_devices, device_limit * span)


def comm_balance_loss(
    num_tokens_sent_G: torch.Tensor, probs_TE: torch.Tensor, num_tokens: float, device_limit: int
) -> torch.Tensor:
    """sum_d f''_d P''_d: f''_d = D/(M T) * (tokens sent to device d), P''_d = sum of d's P_j (V2 eq. 18-20).

    D counts the devices of the current layout (G = ep_size), as V2 does. M, V2's device limit, is here the most
    devices a token can reach (`max_devices_per_token`): the device limit when the routing groups are the devices
    (a new run's default), the number of devices when routing is not device-limited.
    """
    G = num_tokens_sent_G.shape[0]
    f_G = num_tokens_sent_G * (G / (device_limit * num_tokens))
    p_G = ExpertPlacement(probs_TE.shape[-1], G).sum_per_rank(probs_TE.mean(dim=0))
    return (f_G * p_G).sum()


def seq_balance_loss(topk_ids_BTK: torch.Tensor, probs_BTE: torch.Tensor, top_k: int) -> torch.Tensor:
    """Sequence-wise balance (V3 eq. 17-20): the expert-level term within each sequence, averaged over B.

    Its counts are per sequence and a sequence lives whole on one rank, so they are never reduced.
    """
    B, T, E = probs_BTE.shape
    ids_BA = topk_ids_BTK.reshape(B, -1)
    counts_BE1 = torch.zeros(B, E + 1, dtype=torch.float32, device=ids_BA.device)
    ones_BA = torch.ones_like(ids_BA, dtype=torch.float32)
    counts_BE1.scatter_add_(1, torch.where(ids_BA >= 0, ids_BA, E), ones_BA)
    f_BE = counts_BE1[:, :E] * (E / (top_k * T))
    return (f_BE * probs_BTE.mean(dim=1)).sum(dim=-1).mean()


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits_t)^2, keeping router logits small."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()
