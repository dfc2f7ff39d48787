"""Token-to-expert router: fp32 gate, three scoring rules, group- and device-limited selection.

Shape legend: T tokens, D model dim, E routed experts, K active routed experts per token,
G expert groups (or devices), M groups (devices) a token may use.

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

from train.config.model import MoEConfig

SCORINGS = ("softmax_topk", "topk_softmax", "sigmoid")
GROUP_SCORES = ("max", "top2_sum")


class RouterOutput(NamedTuple):
    """Routing decision for T tokens, all fp32.

    `scores_TE` are the unbiased affinities (softmax probabilities, or sigmoid scores for `sigmoid`);
    `topk_weights_TK` are the gate weights the expert outputs are multiplied by (already renormalised and
    scaled by `routed_scaling_factor`); the expert bias never enters them.
    """

    logits_TE: torch.Tensor
    scores_TE: torch.Tensor
    topk_ids_TK: torch.Tensor
    topk_weights_TK: torch.Tensor


def group_limited_mask(
    choice_TE: torch.Tensor, num_groups: int, topk_groups: int, group_score: str
) -> torch.Tensor:
    """Boolean mask (True = allowed) keeping, per token, the experts of its `topk_groups` best groups.

    Experts form `num_groups` contiguous groups. A group's score is its best member (`max`, V2's
    group_limited_greedy) or the sum of its two best members (`top2_sum`, V3's noaux_tc).
    """
    T, E = choice_TE.shape
    choice_TGE = choice_TE.view(T, num_groups, E // num_groups)
    if group_score == "max":
        group_scores_TG = choice_TGE.amax(dim=-1)
    elif group_score == "top2_sum":
        group_scores_TG = choice_TGE.topk(2, dim=-1).values.sum(dim=-1)
    else:
        raise ValueError(f"moe.group_score must be one of {GROUP_SCORES}, got {group_score!r}")
    group_ids_TM = group_scores_TG.topk(topk_groups, dim=-1, sorted=False).indices
    group_mask_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, group_ids_TM, True)
    return group_mask_TG.unsqueeze(-1).expand(T, num_groups, E // num_groups).reshape(T, E)


class Router(nn.Module):
    """Scores T tokens against E routed experts and picks K per token.

    `num_devices` (set by `parallel/` through the MoE layer) enables device-limited routing when
    `moe.device_limit` is set: the experts are split into `num_devices` contiguous blocks (the expert→device
    map) and each token may use at most `device_limit` of them.
    """

    def __init__(self, d_model: int, moe: MoEConfig) -> None:
        super().__init__()
        E, K = moe.num_routed_experts, moe.num_active_routed
        if moe.scoring not in SCORINGS:
            raise ValueError(f"moe.scoring must be one of {SCORINGS}, got {moe.scoring!r}")
        if moe.num_groups > 1:
            _check_groups(E, K, moe.num_groups, moe.topk_groups, "moe.num_groups", "moe.topk_groups")
            if moe.group_score == "top2_sum" and E // moe.num_groups < 2:
                raise ValueError("moe.group_score=top2_sum needs at least 2 experts per group")
        self.num_experts, self.top_k = E, K
        self.scoring = moe.scoring
        self.norm_topk_prob = moe.norm_topk_prob
        self.routed_scaling_factor = moe.routed_scaling_factor
        self.num_groups, self.topk_groups, self.group_score = moe.num_groups, moe.topk_groups, moe.group_score
        self.device_limit = moe.device_limit
        self.num_devices = 1
        self.gate = nn.Linear(d_model, E, bias=False)
        if moe.uses_expert_bias:
            self.register_buffer("expert_bias_E", torch.zeros(E, dtype=torch.float32), persistent=True)
        else:
            self.expert_bias_E: Optional[torch.Tensor] = None

    def _selection_groups(self) -> Optional[tuple[int, int, str]]:
        """(G, M, group score) of the active group restriction, or None when selection is unrestricted.

        When `moe.device_limit` is set and the experts really live on several devices, the device limit takes
        the place of the config's node groups (V3's n_group/topk_group): both are the same mechanism, and under
        expert parallelism the devices are the unit whose traffic is being bounded.
        """
        if self.device_limit is not None and self.num_devices > 1 and self.device_limit < self.num_devices:
            _check_groups(
                self.num_experts, self.top_k, self.num_devices, self.device_limit, "num_devices", "moe.device_limit"
            )
            # A device scores as its best expert (V2's device-limited routing): a device holding one strongly
            # matching expert wins over one with several mediocre ones, keeping the top experts reachable.
            return self.num_devices, self.device_limit, "max"
        if self.num_groups > 1:
            return self.num_groups, self.topk_groups, self.group_score
        return None

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        # fp32 gate: small logit differences decide the top-k and must not be rounded away in bf16. Autocast
        # would cast the matmul back to bf16 whatever its inputs, so it is switched off for the gate.
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.gate.weight.float())
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


def _check_groups(E: int, K: int, G: int, M: int, g_name: str, m_name: str) -> None:
    if E % G != 0:
        raise ValueError(f"{g_name}={G} must divide the number of routed experts {E}")
    if not 1 <= M <= G:
        raise ValueError(f"{m_name}={M} must be in [1, {g_name}={G}]")
    if M * (E // G) < K:
        raise ValueError(f"{m_name}={M} groups of {E // G} experts cannot hold the {K} active experts")
