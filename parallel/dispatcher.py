"""`AllToAllDispatcher`: the expert-parallel token dispatcher (same contract as `LocalDispatcher`).

Shape legend: T tokens on this rank, K routed experts per token, D model dim, C copies this rank sends,
Q copies it receives, N expert rows on this rank, E_loc experts per rank, R = ep_size.

Route of one MoE layer on EP rank r (experts in contiguous blocks of E_loc per rank):
  dispatch  T tokens ─plan_send→ C copies (≤ 1 per (token, destination rank), with the local ids and gate
            weights of its experts on that rank) ─all-to-all→ Q copies ─sort_by_expert→ N rows by local expert.
  combine   N expert outputs ─combine_rows (gate weights, sum per copy)→ Q rows ─reverse all-to-all→ C rows
            ─sum per token→ T rows.
The receiving side treats the Q copies exactly as `LocalDispatcher` treats tokens (K slots, -1 = elsewhere),
so it reuses the model's own permutation helpers.
Deduplication means a token that picks several experts on one rank crosses the network once each way; the
per-rank partial sums happen on the expert side.
"""
from __future__ import annotations

import torch

from parallel.comm import all_to_all, exchange_counts
from parallel.permute import copy_weights, plan_send, sum_rows_into
from train.model.moe.dispatch import combine_rows, gather_rows, sort_by_expert
from train.model.moe.placement import ExpertPlacement


class AllToAllDispatcher:
    """Sends each token once to every EP rank that owns one of its experts and brings the results back.

    Holds state between `dispatch` and `combine` of one layer call (the routing plan); `stats` describes the
    last `dispatch`. `dispatch`/`combine` are collective over `group`: every rank of the EP group calls them
    for the same layers in the same order (also in backward). `placement` is the layer's experts' placement
    (`GroupedExperts.placement`): which EP rank of `group` holds each expert, and this rank's own.
    """

    def __init__(self, group, placement: ExpertPlacement):
        self.group = group
        self.placement = placement
        self.ep_size = placement.ep_size
        self.ep_rank = placement.ep_rank
        self.num_local_experts = placement.num_local_experts
        self.stats: dict = {}
        self._state = None

    def dispatch(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                 may_drop: bool = True):
        """Before: this rank holds its T tokens and their global top-k expert ids (-1 = dropped) and weights.
        After: it holds the N rows destined for its own E_loc experts, from every rank of the EP group, sorted
        by local expert, and `num_tokens_per_local_expert_E` (length E_loc). `may_drop` changes nothing here: the
        all-to-all reads its split sizes on the host anyway, and the received slots for other ranks are -1."""
        plan = plan_send(topk_ids_TK, self.placement)
        send_counts = plan.send_counts_R
        recv_counts = exchange_counts(send_counts, self.group)
        in_splits, out_splits = send_counts.tolist(), recv_counts.tolist()

        x_CD = x_TD[plan.copy_token_C]
        w_CK = copy_weights(topk_weights_TK, plan)
        x_QD, w_QK, ids_QK = all_to_all([x_CD, w_CK, plan.local_ids_CK], out_splits, in_splits, self.group)

        perm_N, num_tokens_per_local_expert_E = sort_by_expert(ids_QK, self.num_local_experts)
        x_ND = gather_rows(x_QD, perm_N, ids_QK.shape[1])
        self._state = (plan, perm_N, w_QK, in_splits, out_splits, x_TD.shape[0])

        self.stats = self._stats(plan, topk_ids_TK, send_counts, recv_counts)
        return x_ND, num_tokens_per_local_expert_E

    def _stats(self, plan, topk_ids_TK, send_counts, recv_counts) -> dict:
        """Detached statistics of this call, read back to the host in one transfer."""
        dev_T = plan.devices_per_token_T
        routed_T = dev_T > 0
        foreign_TK = (topk_ids_TK >= 0) & (self.placement.owner_of(topk_ids_TK) != self.ep_rank)
        sent, naive, received, dev_max, dev_sum, num_routed = torch.stack([
            send_counts.sum() - send_counts[self.ep_rank],
            foreign_TK.sum(),
            recv_counts.sum() - recv_counts[self.ep_rank],
            dev_T.max() if dev_T.numel() else dev_T.new_zeros(()),
            dev_T.sum(),
            routed_T.sum(),
        ]).tolist()
        return {
            "a2a_tokens_sent": sent,  # token copies sent to OTHER ranks (one per token and destination rank)
            "a2a_tokens_sent_naive": naive,  # what one copy per selected expert would have sent
            "a2a_tokens_received": received,
            "devices_per_token_max": dev_max,
            "devices_per_token_mean": dev_sum / max(num_routed, 1),
        }

    def combine(self, y_ND: torch.Tensor) -> torch.Tensor:
        """Before: this rank holds the expert outputs for the N rows `dispatch` returned (same order).
        After: it holds y_TD for its own T tokens: Σ over each token's k experts of gate weight × expert output
        (zeros for tokens whose experts were all dropped). Differentiable in y, the gate weights and x."""
        if self._state is None:
            raise RuntimeError("combine() called before dispatch()")
        plan, perm_N, w_QK, in_splits, out_splits, num_t = self._state
        self._state = None  # one combine per dispatch; frees the routing state
        y_QD = combine_rows(y_ND, perm_N, w_QK)  # gate-weighted partial sum per received copy (fp32 accum)
        (y_CD,) = all_to_all([y_QD], in_splits, out_splits, self.group)
        return sum_rows_into(y_CD, plan.copy_token_C, num_t)
