"""The routing seam and the default router (`topk`): fp32 gate, three scoring rules, group- and device-limited
selection.

Every routing scheme is a `Router` subclass registered by name (`model.moe.router`, see `ROUTERS` in
`train/model/moe/routers.py`). A router returns a `RoutingPlan`: K slots per token, each an expert id (-1 = no
expert) and a gate weight. Token choice fills the K slots with its top-k; expert choice and BASE fill the same
shape (expert choice with K = E slots, slot e used when expert e picked the token), so the capacity code and
both dispatchers consume every scheme unchanged. A router also states its capacity factor, whether its decision
for a token depends on other tokens (`causal`), and its own balance terms (`balance_terms`).

Shape legend: T tokens, D model dim, E routed experts, K active routed experts per token,
J expert groups (node groups, or the routing groups of the device limit), M groups a token may use, G devices of
the layout (ep_size).

The selection mirrors Hugging Face's reference code so converted checkpoints route identically:
`softmax_topk` = DeepseekV2TopkRouter, `topk_softmax` = MixtralTopKRouter / DBRX (p=1 normalisation),
`sigmoid` = DeepseekV3TopkRouter. Like those, top-k uses `sorted=False` where they do, so the order of the K
slots of a token is unspecified; nothing downstream depends on it.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from train.config.choices import GroupScore, Scoring
from train.config.model import MoEConfig
from train.config.routing import check_group_limit
from train.model.moe import losses
from train.model.upcast import upcast_op

SCORINGS = Scoring.values()
GROUP_SCORES = GroupScore.values()
TOKEN_CHOICE_TERMS = ("expert_balance", "device_balance", "comm_balance", "seq_balance", "z_loss")


class RouterOutput(NamedTuple):
    """Routing plan for T tokens, all fp32: K slots per token, each an expert id (-1 = no expert) and a weight.

    `scores_TE` are the unbiased affinities (softmax probabilities, or sigmoid scores for `sigmoid`);
    `topk_weights_TK` are the gate weights the expert outputs are multiplied by (already renormalised and
    scaled by `routed_scaling_factor`); the expert bias never enters them. Schemes without a learned gate (hash)
    leave `logits_TE` and `scores_TE` None. `extras` holds what a scheme's own balance terms need.
    """

    logits_TE: Optional[torch.Tensor]
    scores_TE: Optional[torch.Tensor]
    topk_ids_TK: torch.Tensor
    topk_weights_TK: torch.Tensor
    extras: Optional[dict] = None


RoutingPlan = RouterOutput


class BalanceInputs(NamedTuple):
    """What the layer hands a router's `balance_terms`: the selection counts summed over the data-parallel ranks
    (`counts_E`, `num_tokens`, `sent_G`: token copies per device of the layout), the batch size B and G devices."""

    counts_E: torch.Tensor
    num_tokens: torch.Tensor
    sent_G: torch.Tensor
    batch_size: int
    num_devices: int
    extras: Optional[torch.Tensor] = None  # the router's `count_extras`, summed over the data-parallel ranks


def _fp32_linear(x_TD: torch.Tensor, w_ED: torch.Tensor) -> torch.Tensor:
    return F.linear(x_TD.float(), w_ED.float())


class _Fp32Gate(torch.autograd.Function):
    """`_fp32_linear` of a reduced-precision 2-D x that keeps x itself (not its fp32 copy) for backward, as
    `upcast_op` does, but computes the backward's two products directly instead of recomputing the forward and
    differentiating it: the same products autograd's `mm` backward takes (`grad @ w`, and `gradᵀ @ x` for a
    weight used transposed), so the same bits, without a second forward and a nested autograd call per layer."""

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, w_ED: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x_TD, w_ED)
        return _fp32_linear(x_TD, w_ED)

    @staticmethod
    def backward(ctx, grad_TE: torch.Tensor):
        x_TD, w_ED = ctx.saved_tensors
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            grad_x = grad_TE.mm(w_ED.float()).to(x_TD.dtype) if ctx.needs_input_grad[0] else None
            grad_w = grad_TE.t().mm(x_TD.float()).to(w_ED.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w


def group_limited_mask(
    choice_TE: torch.Tensor, num_groups: int, topk_groups: int, group_score: str
) -> torch.Tensor:
    """Boolean mask (True = allowed) keeping, per token, the experts of its `topk_groups` best groups.

    Experts form `num_groups` contiguous groups. A group's score is its best member (`max`, V2's
    group_limited_greedy) or the sum of its two best members (`top2_sum`, V3's noaux_tc).
    """
    T, E = choice_TE.shape
    choice_TJE = choice_TE.view(T, num_groups, E // num_groups)
    if group_score == "max":
        group_scores_TJ = choice_TJE.amax(dim=-1)
    elif group_score == "top2_sum":
        group_scores_TJ = choice_TJE.topk(2, dim=-1).values.sum(dim=-1)
    else:
        raise ValueError(f"moe.group_score must be one of {GROUP_SCORES}, got {group_score!r}")
    group_ids_TM = group_scores_TJ.topk(topk_groups, dim=-1, sorted=False).indices
    group_mask_TJ = torch.zeros_like(group_scores_TJ, dtype=torch.bool).scatter_(1, group_ids_TM, True)
    return group_mask_TJ.unsqueeze(-1).expand(T, num_groups, E // num_groups).reshape(T, E)


class Router(nn.Module):
    """`topk`, and the base of every scheme: scores T tokens against E routed experts and picks K per token.

    With `moe.device_limit` = M, each token may use experts of at most M of the `moe.routing_groups` contiguous
    expert blocks (train/config/routing.py): a property of the model, the same on any number of ranks. Only a
    config whose `routing_groups` is unresolved (null: a model built by hand, never one a run or checkpoint
    holds) falls back to `num_devices`, the expert-parallel devices `parallel/` sets through the MoE layer.
    """

    def __init__(self, d_model: int, moe: MoEConfig) -> None:
        super().__init__()
        moe.validate()  # the schema's rules, every scheme's included (a ConfigError naming the field)
        E, K = moe.num_routed_experts, moe.num_active_routed
        self.moe = moe
        self.num_experts, self.top_k = E, K
        self.scoring = moe.scoring
        self.norm_topk_prob = moe.norm_topk_prob
        self.routed_scaling_factor = moe.routed_scaling_factor
        self.num_groups, self.topk_groups, self.group_score = moe.num_groups, moe.topk_groups, moe.group_score
        self.device_limit, self.routing_groups = moe.device_limit, moe.routing_groups
        self.num_devices = 1  # the layout; read only while routing_groups is unresolved
        self.gate = nn.Linear(d_model, E, bias=False)
        if moe.uses_expert_bias:
            self.register_buffer("expert_bias_E", torch.zeros(E, dtype=torch.float32), persistent=True)
        else:
            self.expert_bias_E: Optional[torch.Tensor] = None

    # ---- the seam: what every scheme states (defaults are token choice's) ----
    causal = True  # a token's routing depends on that token alone (needed by KV-cache decoding)
    needs_token_ids = False  # the layer passes the token ids to `forward` (hash routing)
    fills_every_slot = True  # every slot names an expert (no -1) before capacity: the dispatch can skip the cut

    def reset_parameters(self, std: float) -> None:
        """normal(0, std) for the learned gate."""
        nn.init.normal_(self.gate.weight, mean=0.0, std=std)

    def capacity_factor(self) -> Optional[float]:
        """Per-expert capacity factor the layer applies to the plan: `moe.eval_capacity_factor` outside training
        when set (ST-MoE: 1.25 in training, 2.0 at evaluation), else `moe.capacity_factor`; None = dropless."""
        if not self.training and self.moe.eval_capacity_factor is not None:
            return self.moe.eval_capacity_factor
        return self.moe.capacity_factor

    def balance_terms(self, plan: RouterOutput, b: BalanceInputs) -> dict[str, torch.Tensor]:
        """Coefficient-weighted balance terms of this scheme, every name always present (0.0 when its coefficient
        is 0). Token choice's: expert, device, communication, sequence balance and the z-loss."""
        moe, E, K, G = self.moe, self.num_experts, self.top_k, b.num_devices
        probs_TE = losses.balance_probs(plan.scores_TE, moe.scoring)
        zero = torch.zeros((), dtype=torch.float32, device=probs_TE.device)
        aux = dict.fromkeys(TOKEN_CHOICE_TERMS, zero)
        counts_E, n_tok = b.counts_E.float(), b.num_tokens.float()
        if moe.expert_balance_coef:
            aux["expert_balance"] = moe.expert_balance_coef * self.expert_balance(plan, b, probs_TE)
        if moe.device_balance_coef:
            aux["device_balance"] = moe.device_balance_coef * losses.device_balance_loss(
                counts_E, probs_TE, n_tok, K, G
            )
        if moe.comm_balance_coef:
            groups = self.routing_groups if self.routing_groups is not None else G
            reach = losses.max_devices_per_token(E, G, groups, moe.device_limit)
            aux["comm_balance"] = moe.comm_balance_coef * losses.comm_balance_loss(
                b.sent_G.float(), probs_TE, n_tok, reach
            )
        if moe.seq_balance_coef:
            B, T = b.batch_size, plan.topk_ids_TK.shape[0]
            aux["seq_balance"] = moe.seq_balance_coef * losses.seq_balance_loss(
                plan.topk_ids_TK.view(B, T // B, K), probs_TE.view(B, T // B, E), K
            )
        if moe.z_loss_coef:
            aux["z_loss"] = moe.z_loss_coef * losses.z_loss(plan.logits_TE)
        return aux

    def expert_balance(self, plan: RouterOutput, b: BalanceInputs, probs_TE: torch.Tensor) -> torch.Tensor:
        """The expert-level term before its coefficient: sum_i f_i P_i (Switch; DeepSeek-V2 eq. 12-14)."""
        return losses.expert_balance_loss(b.counts_E.float(), probs_TE, b.num_tokens.float(), self.top_k)

    def count_extras(self, plan: RouterOutput) -> Optional[torch.Tensor]:
        """Extra non-differentiable counts (fp32, 1-D) the layer sums over data-parallel ranks with its own and
        passes back as `BalanceInputs.extras`; None = nothing."""
        return None

    def _selection_groups(self) -> Optional[tuple[int, int, str]]:
        """(G, M, group score) of the active group restriction, or None when selection is unrestricted.

        When `moe.device_limit` restricts the selection (fewer than all routing groups), it takes the place of
        the config's node groups (V3's n_group/topk_group): both are the same mechanism, and the routing groups
        are the unit whose traffic is being bounded (the devices of the run that fixed them).
        """
        G = self.routing_groups if self.routing_groups is not None else self.num_devices
        if self.device_limit is not None and self.device_limit < G:
            if self.routing_groups is None:  # a resolved value was checked at construction
                check_group_limit(self.num_experts, self.top_k, G, self.device_limit, "num_devices",
                                  "model.moe.device_limit")
            # A group scores as its best expert (V2's device-limited routing): a group holding one strongly
            # matching expert wins over one with several mediocre ones, keeping the top experts reachable.
            return G, self.device_limit, "max"
        if self.num_groups > 1:
            return self.num_groups, self.topk_groups, self.group_score
        return None

    def gate_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """fp32 `x W_g^T`, `_TE`. fp32 gate: small logit differences decide the top-k and must not be rounded away
        in bf16. Autocast would cast the matmul back to bf16 whatever its inputs, so it is switched off for the
        gate. A bf16 x (precision=bf16) is kept for backward as it is, not as its fp32 copy (`_Fp32Gate`; other
        shapes `upcast_op`)."""
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            if x_TD.dim() == 2 and x_TD.dtype != torch.float32 and torch.is_grad_enabled():
                return _Fp32Gate.apply(x_TD, self.gate.weight)
            return upcast_op(_fp32_linear, x_TD, self.gate.weight)

    def forward(self, x_TD: torch.Tensor, token_ids_T: Optional[torch.Tensor] = None) -> RouterOutput:
        logits_TE = self.gate_logits(x_TD)
        if self.scoring == "sigmoid":
            scores_TE = logits_TE.sigmoid()
        else:
            scores_TE = logits_TE.softmax(dim=-1)
        choice_TE = scores_TE.detach()
        if self.expert_bias_E is not None:
            choice_TE = choice_TE + self.expert_bias_E
        groups = self._selection_groups()
        if groups is not None:
            # -inf, not V2's 0.0: biased sigmoid scores can be negative. Softmax scores are > 0, so for V2
            # the selection is the same.
            choice_TE = choice_TE.masked_fill(~group_limited_mask(choice_TE, *groups), float("-inf"))
        topk_ids_TK = choice_TE.topk(self.top_k, dim=-1, sorted=self.scoring == "topk_softmax").indices
        topk_weights_TK = scores_TE.gather(1, topk_ids_TK)
        if self.scoring == "topk_softmax":
            # Softmax over the k chosen logits equals the chosen probabilities renormalised (Mixtral's code).
            topk_weights_TK = topk_weights_TK / topk_weights_TK.sum(dim=-1, keepdim=True)
        elif self.norm_topk_prob:
            topk_weights_TK = topk_weights_TK / (topk_weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        topk_weights_TK = topk_weights_TK * self.routed_scaling_factor
        return RouterOutput(logits_TE, scores_TE, topk_ids_TK, topk_weights_TK)

