"""Token-choice schemes of the literature: noisy top-k (Shazeer et al. 2017), Switch (Fedus et al. 2021),
GShard (Lepikhin et al. 2020). Each fills the token-choice plan (K slots per token) like `topk`.

Shape legend: T tokens, D model dim, E routed experts, K active routed experts per token.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from train.config.model import MoEConfig
from train.model.moe.router import BalanceInputs, Router, RouterOutput


def cv_squared(x_E: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation, population variance over squared mean (Shazeer et al.'s CV^2)."""
    x_E = x_E.float()
    return x_E.var(unbiased=False) / (x_E.mean().square() + 1e-10)


def prob_in_top_k(clean_TE: torch.Tensor, noisy_TE: torch.Tensor, noise_std_TE: torch.Tensor, k: int) -> torch.Tensor:
    """P(x, i) of Shazeer et al. (eq. 9): the probability that expert i stays in the top k when only its own noise
    is redrawn, Phi((clean_i - kth_excluding(H, k, i)) / noise_std_i). kth_excluding is the (k+1)-th largest
    noisy logit for an expert now in the top k and the k-th largest for one outside it. Needs k < E."""
    top_TK1 = noisy_TE.topk(k + 1, dim=-1).values
    threshold_in_T1, threshold_out_T1 = top_TK1[:, k : k + 1], top_TK1[:, k - 1 : k]
    is_in_TE = noisy_TE > threshold_in_T1
    normal = torch.distributions.Normal(0.0, 1.0)
    prob_in_TE = normal.cdf((clean_TE - threshold_in_T1) / noise_std_TE)
    prob_out_TE = normal.cdf((clean_TE - threshold_out_T1) / noise_std_TE)
    return torch.where(is_in_TE, prob_in_TE, prob_out_TE)


class NoisyTopKRouter(Router):
    """Noisy top-k gating (Shazeer et al. 2017, eq. 3-5): H = x W_g + N(0, 1) * softplus(x W_noise) in training
    (clean logits at evaluation), G = softmax over the k largest H (zero elsewhere). Balance terms (eq. 6-10):
    `importance` = w_importance CV(Importance)^2 with Importance_i = sum_t G_i(x_t), and `load` = w_load CV(Load)^2
    with Load_i = sum_t P(x_t, i), both over this rank's tokens (they are differentiable); `load` is 0 outside
    training, where there is no noise. The noise draws use the global RNG, which activation checkpointing
    restores for its recompute."""

    TERMS = ("importance", "load")

    def __init__(self, d_model: int, moe: MoEConfig) -> None:
        super().__init__(d_model, moe)  # validates moe.load_coef against top_k (MoEConfig._validate_router)
        self.noise = nn.Linear(d_model, self.num_experts, bias=False)

    def reset_parameters(self, std: float) -> None:
        """Gate normal(0, std); W_noise zero as in the paper (noise of std softplus(0) at the start)."""
        super().reset_parameters(std)
        nn.init.zeros_(self.noise.weight)

    def forward(self, x_TD: torch.Tensor, token_ids_T: Optional[torch.Tensor] = None) -> RouterOutput:
        clean_TE = self.gate_logits(x_TD)
        extras = {}
        noisy_TE = clean_TE
        if self.training:
            with torch.autocast(device_type=x_TD.device.type, enabled=False):
                noise_std_TE = F.softplus(F.linear(x_TD.float(), self.noise.weight.float())) + 1e-9
            noisy_TE = clean_TE + torch.randn_like(clean_TE) * noise_std_TE
            if self.moe.load_coef:
                extras["load_TE"] = prob_in_top_k(clean_TE, noisy_TE, noise_std_TE, self.top_k)
        top_vals_TK, topk_ids_TK = noisy_TE.topk(self.top_k, dim=-1)
        topk_weights_TK = top_vals_TK.softmax(dim=-1)
        gates_TE = torch.zeros_like(clean_TE).scatter(1, topk_ids_TK, topk_weights_TK)
        return RouterOutput(noisy_TE, gates_TE, topk_ids_TK, topk_weights_TK * self.routed_scaling_factor, extras)

    def balance_terms(self, plan: RouterOutput, b: BalanceInputs) -> dict[str, torch.Tensor]:
        aux = super().balance_terms(plan, b)
        zero = plan.scores_TE.new_zeros(())
        aux["importance"] = (self.moe.importance_coef * cv_squared(plan.scores_TE.sum(0))
                             if self.moe.importance_coef else zero)
        load_TE = (plan.extras or {}).get("load_TE")
        aux["load"] = self.moe.load_coef * cv_squared(load_TE.sum(0)) if load_TE is not None else zero
        return aux


class SwitchRouter(Router):
    """Switch routing (Fedus et al. 2021): top-1 over softmax probabilities, the gate the chosen probability p_i
    (not renormalised), capacity from `moe.capacity_factor`, and the optional multiplicative jitter of the router
    input, x * U(1 - eps, 1 + eps), in training only (`moe.jitter_eps`). Its balance term is `expert_balance`,
    which at K = 1 is the paper's alpha * E * sum_i f_i P_i."""

    def __init__(self, d_model: int, moe: MoEConfig) -> None:
        super().__init__(d_model, moe)  # validates top-1, softmax scoring, no renormalisation

    def forward(self, x_TD: torch.Tensor, token_ids_T: Optional[torch.Tensor] = None) -> RouterOutput:
        eps = self.moe.jitter_eps
        if self.training and eps > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
        return super().forward(x_TD)


class GShardRouter(Router):
    """GShard top-2 gating (Lepikhin et al. 2020, Algorithm 1): softmax gates; e1, e2 the two best experts with
    g1, g2 renormalised by g1 + g2; in training the second expert is used only with probability min(1, 2 g2)
    (random routing: a weak second choice is often skipped). Capacity 2T/E is `moe.capacity_factor=1.0` (the
    layer's ceil(f T K / E) with K = 2). Balance term `expert_balance` = coef * (1/E) sum_e (c_e / S) m_e, c_e the
    tokens whose FIRST choice is e (summed over data-parallel ranks), m_e the mean gate of e over this rank's
    tokens (the differentiable proxy)."""

    fills_every_slot = False  # the second slot is -1 when its random draw skips it

    def __init__(self, d_model: int, moe: MoEConfig) -> None:
        super().__init__(d_model, moe)  # validates top-2 and softmax scoring

    def forward(self, x_TD: torch.Tensor, token_ids_T: Optional[torch.Tensor] = None) -> RouterOutput:
        logits_TE = self.gate_logits(x_TD)
        gates_TE = logits_TE.softmax(dim=-1)
        top_vals_TK, topk_ids_TK = gates_TE.topk(2, dim=-1)  # sorted: slot 0 is the first choice
        g_TK = top_vals_TK / top_vals_TK.sum(dim=-1, keepdim=True)
        if self.training:
            keep_second_T = torch.rand_like(g_TK[:, 1]) < 2.0 * g_TK[:, 1].detach()
            topk_ids_TK = torch.stack([topk_ids_TK[:, 0], torch.where(keep_second_T, topk_ids_TK[:, 1], -1)], dim=1)
            g_TK = torch.stack([g_TK[:, 0], torch.where(keep_second_T, g_TK[:, 1], 0.0)], dim=1)
        return RouterOutput(logits_TE, gates_TE, topk_ids_TK, g_TK * self.routed_scaling_factor)

    def count_extras(self, plan: RouterOutput) -> Optional[torch.Tensor]:
        """c_e: tokens whose first choice is e (summed over data-parallel ranks by the layer)."""
        first_T = plan.topk_ids_TK[:, 0]
        return torch.zeros(self.num_experts, device=first_T.device).scatter_add_(
            0, first_T, torch.ones_like(first_T, dtype=torch.float32))

    def expert_balance(self, plan: RouterOutput, b: BalanceInputs, probs_TE: torch.Tensor) -> torch.Tensor:
        """(1/E) sum_e (c_e / S) m_e (GShard eq. 4): first choices only in c_e."""
        return (b.extras.float() / b.num_tokens.float() * probs_TE.mean(dim=0)).sum() / self.num_experts
