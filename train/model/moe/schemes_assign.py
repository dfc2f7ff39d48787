"""Schemes that do not let each token pick its own top k: Expert Choice (Zhou et al. 2022), BASE layers (Lewis
et al. 2021) and hash layers (Roller et al. 2021). All three fill the token-choice plan shape, so the capacity
code and both dispatchers take them unchanged; each plan is a deterministic function of its inputs (activation
checkpointing's recompute gives the same one).

Shape legend: T tokens, D model dim, E routed experts, K plan slots per token, U tokens an expert picks (its
capacity C).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from train.config.model import MoEConfig
from train.model.moe.capacity import expert_capacity
from train.model.moe.losses import z_loss
from train.model.moe.router import BalanceInputs, Router, RouterOutput


class ExpertChoiceRouter(Router):
    """Expert Choice (Zhou et al. 2022, eq. 1-2): S = softmax(X W_g) over experts; each expert e takes its C
    highest-scoring tokens, C = ceil(f T K / E) (f = `moe.capacity_factor`, 1.0 when null; the paper's capacity
    factor c is K f, the average experts per token), and a picked token's output is sum_e S[t, e] FFN_e(x_t).

    Plan: K = E slots per token, slot e holding e when expert e picked the token (-1 otherwise) and weight S[t, e].
    A token may get no expert or several. The choice compares the tokens of the whole (micro-)batch, future
    positions included, so it is for training only: a KV-cache forward refuses it (`causal` is False). No balance
    term (balanced by construction) but the z-loss if its coefficient is set. Under expert parallelism each rank
    picks among its own tokens."""

    causal = False
    fills_every_slot = False  # slot e is -1 unless expert e picked the token

    def forward(self, x_TD: torch.Tensor, token_ids_T: Optional[torch.Tensor] = None) -> RouterOutput:
        logits_TE = self.gate_logits(x_TD)
        scores_TE = logits_TE.softmax(dim=-1)
        T, E = scores_TE.shape
        C = min(T, expert_capacity(T, self.top_k, E, self.moe.capacity_factor or 1.0))
        picked_EU = scores_TE.detach().t().topk(C, dim=-1).indices
        chosen_TE = torch.zeros(T, E, dtype=torch.bool, device=x_TD.device)
        chosen_TE.scatter_(0, picked_EU.t(), True)
        experts_TE = torch.arange(E, device=x_TD.device).expand(T, E)
        ids_TE = torch.where(chosen_TE, experts_TE, -1)
        weights_TE = torch.where(chosen_TE, scores_TE, 0.0) * self.routed_scaling_factor
        return RouterOutput(logits_TE, scores_TE, ids_TE, weights_TE)

    def capacity_factor(self) -> Optional[float]:
        return None  # the plan is the capacity

    def balance_terms(self, plan: RouterOutput, b: BalanceInputs) -> dict[str, torch.Tensor]:
        zero = plan.scores_TE.new_zeros(())
        return {"z_loss": self.moe.z_loss_coef * z_loss(plan.logits_TE) if self.moe.z_loss_coef else zero}


def sinkhorn_plan(scores_TE: torch.Tensor, num_iters: int) -> torch.Tensor:
    """log of Sinkhorn's scaling of exp(scores), `_TE`: rows summing to 1 (one token each) and columns to T/E (an
    even share each), alternated `num_iters` times in the log domain. The entropic relaxation of BASE's linear
    assignment problem."""
    T, E = scores_TE.shape
    log_p_TE = scores_TE.float()
    log_col = math.log(T / E)
    for _ in range(num_iters):
        log_p_TE = log_p_TE - torch.logsumexp(log_p_TE, dim=0, keepdim=True) + log_col
        log_p_TE = log_p_TE - torch.logsumexp(log_p_TE, dim=1, keepdim=True)
    return log_p_TE


def balanced_rounding(value_TE: torch.Tensor, capacity: int) -> torch.Tensor:
    """Expert of each token, `_T`, no expert above `capacity` tokens (needs T <= E * capacity): in rounds, every
    unassigned token proposes its best expert not yet full; an expert accepts its highest-valued proposals up to
    its free room and is then full for the rejected ones. At most E rounds; deterministic (stable sorts)."""
    T, E = value_TE.shape
    device = value_TE.device
    assign_T = torch.full((T,), -1, dtype=torch.long, device=device)
    room_E = torch.full((E,), capacity, dtype=torch.long, device=device)
    allowed_TE = torch.ones(T, E, dtype=torch.bool, device=device)
    arange_T = torch.arange(T, device=device)
    for _ in range(E):
        free_T = assign_T < 0
        if not bool(free_T.any()):
            break
        pref_T = torch.where(allowed_TE, value_TE, -math.inf).argmax(dim=-1)
        val_T = value_TE.gather(1, pref_T.unsqueeze(1)).squeeze(1)
        group_T = torch.where(free_T, pref_T, E)  # assigned tokens sort into a group of their own
        by_value = torch.sort(val_T, descending=True, stable=True).indices
        order = by_value[torch.sort(group_T[by_value], stable=True).indices]  # by expert, best first within
        counts_E1 = torch.bincount(group_T, minlength=E + 1)
        starts_E1 = torch.cumsum(counts_E1, 0) - counts_E1
        rank_T = torch.empty_like(order).scatter_(0, order, arange_T - starts_E1[group_T[order]])
        accept_T = free_T & (rank_T < torch.cat([room_E, room_E.new_zeros(1)])[group_T])
        assign_T = torch.where(accept_T, pref_T, assign_T)
        room_E = room_E - torch.bincount(pref_T[accept_T], minlength=E)
        rejected_T = free_T & ~accept_T
        allowed_TE[rejected_T, pref_T[rejected_T]] = False
    return assign_T


def sinkhorn_assign(scores_TE: torch.Tensor, num_iters: int) -> torch.Tensor:
    """Balanced top-1 assignment of T tokens to E experts, `_T`: each expert takes at most ceil(T/E) tokens
    (exactly T/E when E divides T). Sinkhorn's plan (`sinkhorn_plan`) ranks the (token, expert) pairs and
    `balanced_rounding` turns it into an assignment. An approximation of BASE's optimal linear assignment, which
    the paper solves exactly with an auction algorithm."""
    T, E = scores_TE.shape
    return balanced_rounding(sinkhorn_plan(scores_TE, num_iters), math.ceil(T / E))


class BaseRouter(Router):
    """BASE layers (Lewis et al. 2021): each token goes to exactly one expert; in training the assignment
    maximises sum_t h_t . w_{a_t} subject to every expert taking T/E tokens (here: `sinkhorn_assign`, Sinkhorn
    with `moe.sinkhorn_iters` iterations and a balanced rounding, not the paper's auction); at evaluation each
    token takes its best expert (greedy, as the paper does at test time), so decoding is causal. The output is
    sigmoid(h_t . w_{a_t}) FFN_{a_t}(h_t) (the residual is the block's). No balance term; top_k must be 1."""

    def __init__(self, d_model: int, moe: MoEConfig) -> None:
        super().__init__(d_model, moe)  # validates top-1

    @property
    def causal(self) -> bool:
        return not self.training

    def forward(self, x_TD: torch.Tensor, token_ids_T: Optional[torch.Tensor] = None) -> RouterOutput:
        logits_TE = self.gate_logits(x_TD)
        if self.training:
            ids_T = sinkhorn_assign(logits_TE.detach(), self.moe.sinkhorn_iters)
        else:
            ids_T = logits_TE.argmax(dim=-1)
        ids_T1 = ids_T.unsqueeze(1)
        weights_T1 = logits_TE.gather(1, ids_T1).sigmoid() * self.routed_scaling_factor
        return RouterOutput(logits_TE, logits_TE.softmax(dim=-1), ids_T1, weights_T1)

    def capacity_factor(self) -> Optional[float]:
        return None  # balanced by the assignment

    def balance_terms(self, plan: RouterOutput, b: BalanceInputs) -> dict[str, torch.Tensor]:
        return {}


# Knuth's multiplicative hash constant (2^32 / golden ratio): consecutive ids land far apart.
_HASH_MULTIPLIER = 2654435761


def hash_experts(token_ids_T: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Expert of each token id, `_T`: ((id * 2654435761) mod 2^32) mod E, fixed for ever."""
    return (token_ids_T.long() * _HASH_MULTIPLIER) % (1 << 32) % num_experts


class HashRouter(Router):
    """Hash layers (Roller et al. 2021): token t goes to expert hash(id_t) (`hash_experts`), a fixed function of
    its token id with no learned router, and the expert's output is taken as it is (weight 1). Needs the token
    ids (the layer passes them; MTP modules do not). No balance term; top_k must be 1."""

    needs_token_ids = True

    def __init__(self, d_model: int, moe: MoEConfig) -> None:
        super().__init__(d_model, moe)  # validates top-1
        del self.gate  # no learned router

    def reset_parameters(self, std: float) -> None:
        pass

    def forward(self, x_TD: torch.Tensor, token_ids_T: Optional[torch.Tensor] = None) -> RouterOutput:
        if token_ids_T is None:
            raise ValueError("model.moe.router=hash routes on the token ids, but this MoE layer was called without "
                             "them (multi-token-prediction modules do not pass them: use model.mtp_depth=0)")
        ids_T1 = hash_experts(token_ids_T, self.num_experts).unsqueeze(1)
        weights_T1 = torch.ones(ids_T1.shape, dtype=torch.float32, device=x_TD.device)
        return RouterOutput(None, None, ids_T1, weights_T1)

    def capacity_factor(self) -> Optional[float]:
        return None

    def balance_terms(self, plan: RouterOutput, b: BalanceInputs) -> dict[str, torch.Tensor]:
        return {}
