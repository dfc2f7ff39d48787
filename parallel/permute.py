"""Pure index bookkeeping for the deduplicated expert-parallel all-to-all (no communication here).

Shape legend: T tokens on this rank, K routed experts per token, D model dim, R = ep_size ranks of the EP
group, C token copies this rank sends (at most one per (token, destination rank)), E_loc experts per rank.

The receiving side needs no helper of its own: received copies with their local expert ids are exactly the
input of `train.model.moe.dispatch.sort_by_expert` / `combine_rows` (K slots per copy, -1 = elsewhere).

Which EP rank holds which expert is the layer's `ExpertPlacement` (contiguous blocks of E_loc experts): the plan
asks it for owners and local indices. Expert id -1 means "dropped" (capacity) and goes nowhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from train.model.moe.dispatch import take_rows
from train.model.moe.placement import ExpertPlacement


@dataclass
class SendPlan:
    """Which copies a rank sends. Copies are ordered by (destination rank, token index), which is the order
    `all_to_all_single` wants: the first `send_counts_R[0]` rows go to EP rank 0, and so on."""

    copy_token_C: torch.Tensor  # int64 [C]: source token of each copy
    copy_rank_C: torch.Tensor  # int64 [C]: destination EP rank of each copy
    local_ids_CK: torch.Tensor  # [C, K] `id_dtype`: local expert id on the destination, -1 if slot k is not there
    send_counts_R: torch.Tensor  # int64 [R]: copies per destination rank
    slots_R: torch.Tensor  # int64 [R]: (token, expert) assignments per destination rank (rows its experts run)
    devices_per_token_T: torch.Tensor  # int64 [T]: distinct destination ranks per token (0 if all dropped)


def id_dtype(num_local_experts: int) -> torch.dtype:
    """The smallest signed integer type that holds local expert ids 0..E_loc-1 and -1 (what crosses the wire)."""
    for dtype in (torch.int8, torch.int16, torch.int32):
        if num_local_experts - 1 <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


def plan_send(topk_ids_TK: torch.Tensor, placement: ExpertPlacement,
              num_copies: Optional[Callable[[torch.Tensor, torch.Tensor], int]] = None) -> SendPlan:
    """Deduplicate a token's top-k into one copy per destination rank of `placement` (its `ep_rank` plays no
    part: every rank plans the same way).

    `num_copies(send_counts_R, slots_R)` returns C, the number of copies, on the host: the dispatcher passes the
    function that exchanges the counts with the other ranks (the one host synchronisation a dispatch needs), so
    that listing the copies (`nonzero_static`) does not synchronise again. Without it C is read from the counts.

    Example (E=4 over R=2, E_loc=2): token 0 picks experts [3, 0] → one copy to rank 1 with local ids [1, -1] and one
    copy to rank 0 with local ids [-1, 0]; token 1 picks [2, 3] → a single copy to rank 1 with ids [0, 1].
    """
    T, K = topk_ids_TK.shape
    ep_size = placement.ep_size
    owner_TK = placement.owner_of(topk_ids_TK)
    kept_owner_A = torch.where(owner_TK >= 0, owner_TK, ep_size).reshape(-1)
    hit_TR = torch.zeros(T, ep_size + 1, dtype=torch.bool, device=topk_ids_TK.device)
    # column ep_size collects dropped slots (owner -1) so that a single scatter handles every slot
    hit_TR.scatter_(1, kept_owner_A.view(T, K), True)
    hit_TR = hit_TR[:, :ep_size]
    send_counts_R = hit_TR.sum(0)
    # scatter_add, not bincount: CUDA's bincount reads the largest id on the host
    slots_R = torch.zeros(ep_size + 1, dtype=torch.long, device=topk_ids_TK.device).scatter_add_(
        0, kept_owner_A, torch.ones_like(kept_owner_A))[:ep_size]
    C = num_copies(send_counts_R, slots_R) if num_copies is not None else int(send_counts_R.sum())
    flat_C = torch.nonzero_static(hit_TR.t().reshape(-1), size=C).view(-1)  # row-major over (rank, token)
    copy_rank_C, copy_token_C = flat_C // T, flat_C % T
    on_dest_CK = owner_TK.index_select(0, copy_token_C) == copy_rank_C[:, None]
    local_ids_CK = torch.where(on_dest_CK, topk_ids_TK.index_select(0, copy_token_C) -
                               placement.start_of(copy_rank_C[:, None]), -1)
    return SendPlan(copy_token_C, copy_rank_C, local_ids_CK.to(id_dtype(placement.num_local_experts)),
                    send_counts_R, slots_R, hit_TR.sum(1))


def copy_weights(topk_weights_TK: torch.Tensor, plan: SendPlan) -> torch.Tensor:
    """Gate weights that travel with each copy: the weights of the slots on its destination, 0 elsewhere.
    Differentiable with respect to `topk_weights_TK`."""
    K, R = topk_weights_TK.shape[1], plan.send_counts_R.shape[0]
    w_CK = take_rows(topk_weights_TK, plan.copy_token_C, min(K, R))  # a token's weights at most once per rank
    return w_CK * (plan.local_ids_CK >= 0).to(w_CK.dtype)


class _SumRowsInto(torch.autograd.Function):
    """`zeros.index_add(0, index, rows.float()).to(rows.dtype)` with the same ops both ways, saving only the
    index: autograd's `index_add` would save its fp32 source (the rows' fp32 copy) for the shape alone."""

    @staticmethod
    def forward(ctx, rows_MD: torch.Tensor, index_M: torch.Tensor, num_out: int) -> torch.Tensor:
        out = torch.zeros((num_out,) + tuple(rows_MD.shape[1:]), dtype=torch.float32, device=rows_MD.device)
        ctx.save_for_backward(index_M)
        ctx.rows_dtype = rows_MD.dtype
        return out.index_add_(0, index_M, rows_MD.float()).to(rows_MD.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (index_M,) = ctx.saved_tensors
        if grad_out.dtype == ctx.rows_dtype:  # through fp32 and back is exact: select in the rows' own dtype
            return grad_out.index_select(0, index_M), None, None
        return grad_out.float().index_select(0, index_M).to(ctx.rows_dtype), None, None


def sum_rows_into(rows_MD: torch.Tensor, index_M: torch.Tensor, num_out: int) -> torch.Tensor:
    """out[i] = Σ rows[m] over m with index[m] == i, accumulated in fp32 and returned in the rows' dtype
    (a token's copies from several ranks are summed, as `combine_rows` sums its K slots). Differentiable, keeping
    only the index for backward; indices that no row names get zeros."""
    return _SumRowsInto.apply(rows_MD, index_M, num_out)
