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

What crosses the wire, per copy (`parallel/comm.py` packs it into one collective each way):
  dispatch  the token's row in the compute dtype (bf16 under bf16; e4m3 + one fp32 scale per 128 values with
            `parallel.a2a_dtype=fp8`), its K gate weights (fp32, 0 for slots elsewhere) and K local expert ids in
            the smallest integer type that holds them (int8 up to 127 experts per rank)
  combine   one row in the compute dtype: the gate-weighted sum of the copy's expert outputs on that rank
Why the gate weights travel, against keeping them home and applying them after the combine: deduplication sends a
token once to a rank however many of its experts live there, and returns ONE summed row. Keeping the weights home
would need each expert's output back separately, (experts per copy − 1) extra rows on the combine, to save 4·K
bytes on a row of 2·D. `scripts/bench_dispatch.py` prints both (`combine_bytes_per_token_weights_home`).

Overlap (`parallel.overlap`, on by default): the combine's exchange is launched asynchronously and the layer's
shared expert (its gate included) computes while it is in flight, as Megatron's `--moe-shared-expert-overlap`
does; the backward's reverse exchanges stay synchronous.

Host synchronisations per dispatch: one, reading the split sizes (copies and expert rows per rank, exchanged in one
small all-to-all). The copies are listed with `nonzero_static` at the size just read, the receiving side cuts its
sort at the row count it was sent, and the statistics stay on the device. Combine has none. When the EP group is
the whole world, the layer's balance counts ride in that same small exchange (`sum_in_next_dispatch`), so the MoE
layer's forward enters three collectives (counts, dispatch, combine), not four.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Optional

import torch

from parallel.comm import all_to_all, all_to_all_start, exchange_counts
from parallel.permute import copy_weights, plan_send, sum_rows_into
from train.model.moe.dispatch import combine_rows, gather_rows, sort_by_expert, take_rows
from train.model.moe.placement import ExpertPlacement


class _LazyStats(Mapping):
    """A read-only dict of statistics whose costlier entries `more()` computes on the first access to any of them."""

    def __init__(self, eager: dict, more: Callable[[], dict]):
        self._items, self._more = dict(eager), more

    def _all(self) -> dict:
        if self._more is not None:
            self._items.update(self._more())
            self._more = None
        return self._items

    def __getitem__(self, key):
        return self._items[key] if key in self._items else self._all()[key]

    def __iter__(self):
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


class AllToAllDispatcher:
    """Sends each token once to every EP rank that owns one of its experts and brings the results back.

    Holds state between `dispatch` and `combine` of one layer call (the routing plan); `stats` describes the
    last `dispatch`. `dispatch`/`combine` are collective over `group`: every rank of the EP group calls them
    for the same layers in the same order (also in backward). `placement` is the layer's experts' placement
    (`GroupedExperts.placement`): which EP rank of `group` holds each expert, and this rank's own.
    `fp8`: dispatch the rows as FP8 e4m3 with tile scales (`parallel.a2a_dtype=fp8`); combine stays in the
    compute dtype. `overlap`: run the layer's shared expert while the combine is on the wire
    (`parallel.overlap`).
    """

    def __init__(self, group, placement: ExpertPlacement, fp8: bool = False, overlap: bool = True):
        self.group = group
        self.placement = placement
        self.fp8 = fp8
        self.overlap = overlap
        self.ep_size = placement.ep_size
        self.ep_rank = placement.ep_rank
        self.num_local_experts = placement.num_local_experts
        self.stats: Mapping = {}
        self._state = None
        self._rider: Optional[tuple[torch.Tensor, dict]] = None

    def sum_in_next_dispatch(self, t_P: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Sum `t_P` (1-D, 8-byte dtype, the same length on every rank) over the EP group inside the next
        `dispatch`'s counts exchange, where it costs no collective of its own; the returned function gives the sum
        once that dispatch has run. The MoE layer's balance counts ride here when the EP group is the whole world
        (`parallel.parallelize`): integer counts, so the order of the sum does not matter."""
        if t_P.dim() != 1 or t_P.element_size() != 8:
            raise ValueError(f"sum_in_next_dispatch takes a 1-D tensor of an 8-byte dtype, got {t_P.dtype} "
                             f"of shape {tuple(t_P.shape)}")
        box: dict = {}
        self._rider = (t_P, box)

        def result() -> torch.Tensor:
            if "sum" not in box:
                raise RuntimeError("sum_in_next_dispatch: the result was asked for before the dispatch ran")
            return box["sum"]

        return result

    def dispatch(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                 may_drop: bool = True):
        """Before: this rank holds its T tokens and their global top-k expert ids (-1 = dropped) and weights.
        After: it holds the N rows destined for its own E_loc experts, from every rank of the EP group, sorted
        by local expert, and `num_tokens_per_local_expert_E` (length E_loc). `may_drop` changes nothing here: the
        row counts come with the split sizes, and the received slots for other ranks are -1."""
        splits = {}
        rider, self._rider = self._rider, None

        def exchange(send_counts_R, slots_R):
            # the one host sync: how many copies and expert rows go to, and come from, every rank
            send_R2 = torch.stack([send_counts_R, slots_R], 1)
            if rider is not None:  # the same values to every rank, as int64 bits beside the counts
                bits_P = rider[0].view(torch.int64)
                send_R2 = torch.cat([send_R2, bits_P.expand(send_R2.shape[0], bits_P.shape[0])], 1)
            recv_R2 = exchange_counts(send_R2, self.group)
            if rider is not None:
                rider[1]["sum"] = recv_R2[:, 2:].contiguous().view(rider[0].dtype).sum(0)
                recv_R2 = recv_R2[:, :2]
            host = torch.cat([send_counts_R, recv_R2[:, 0], recv_R2[:, 1].sum().view(1)]).tolist()
            R = self.ep_size
            splits.update(in_splits=host[:R], out_splits=host[R : 2 * R], num_rows=host[2 * R], recv_R2=recv_R2)
            return sum(host[:R])

        plan = plan_send(topk_ids_TK, self.placement, num_copies=exchange)
        in_splits, out_splits = splits["in_splits"], splits["out_splits"]

        x_CD = take_rows(x_TD, plan.copy_token_C, min(topk_ids_TK.shape[1], self.ep_size))  # ≤ 1 copy per rank
        w_CK = copy_weights(topk_weights_TK, plan)
        x_QD, w_QK, ids_QK = all_to_all([x_CD, w_CK, plan.local_ids_CK], out_splits, in_splits, self.group,
                                        fp8_rows=self.fp8)

        perm_A, num_tokens_per_local_expert_E = sort_by_expert(ids_QK.long(), self.num_local_experts,
                                                               keep_dropped=True)
        perm_N = perm_A[: splits["num_rows"]]  # the other ranks' slots (-1) sort last
        x_ND = gather_rows(x_QD, perm_N, ids_QK.shape[1])
        self._state = (plan, perm_N, w_QK, in_splits, out_splits, x_TD.shape[0])

        self.stats = self._stats(plan, topk_ids_TK, splits["recv_R2"][:, 0])
        return x_ND, num_tokens_per_local_expert_E

    def _stats(self, plan, topk_ids_TK, recv_counts_R) -> "_LazyStats":
        """Detached statistics of this call, kept on the device (the metrics fold them in without a sync). The
        layer reads only `a2a_tokens_sent` each call; the rest (benchmarks, tests) is computed on first access."""
        send_counts = plan.send_counts_R
        dev_T = plan.devices_per_token_T
        placement, ep_rank = self.placement, self.ep_rank

        def more() -> dict:
            foreign_TK = (topk_ids_TK >= 0) & (placement.owner_of(topk_ids_TK) != ep_rank)
            return {
                "a2a_tokens_sent_naive": foreign_TK.sum(),  # what one copy per selected expert would have sent
                "a2a_tokens_received": recv_counts_R.sum() - recv_counts_R[ep_rank],
                "devices_per_token_max": dev_T.max() if dev_T.numel() else dev_T.new_zeros(()),
                "devices_per_token_mean": dev_T.sum() / (dev_T > 0).sum().clamp(min=1),
            }

        # token copies sent to OTHER ranks (one per token and destination rank)
        return _LazyStats({"a2a_tokens_sent": send_counts.sum() - send_counts[ep_rank]}, more)

    def combine(self, y_ND: torch.Tensor, overlap: Optional[Callable[[], None]] = None) -> torch.Tensor:
        """Before: this rank holds the expert outputs for the N rows `dispatch` returned (same order).
        After: it holds y_TD for its own T tokens: Σ over each token's k experts of gate weight × expert output
        (zeros for tokens whose experts were all dropped). Differentiable in y, the gate weights and x.
        `overlap()` (the shared expert) is called once, while the exchange is in flight when `self.overlap`,
        after it otherwise: the same operations either way, so the same results."""
        if self._state is None:
            raise RuntimeError("combine() called before dispatch()")
        plan, perm_N, w_QK, in_splits, out_splits, num_t = self._state
        self._state = None  # one combine per dispatch; frees the routing state
        y_QD = combine_rows(y_ND, perm_N, w_QK)  # gate-weighted partial sum per received copy (fp32 accum)
        pending = all_to_all_start([y_QD], in_splits, out_splits, self.group)
        if overlap is not None and self.overlap:
            overlap()
        (y_CD,) = pending.wait()
        if overlap is not None and not self.overlap:
            overlap()
        return sum_rows_into(y_CD, plan.copy_token_C, num_t)
