"""Token dispatchers: move token copies to their experts and bring the results back.

Shape legend: T tokens, D model dim, K active routed experts per token, E experts (local to this rank),
N routed rows (kept token copies, grouped by expert ascending).

The permutation helpers are pure functions so other dispatchers (`parallel/`'s all-to-all) reuse them and
they can be tested on hand-worked indices. A flat assignment index is `t * K + k` (token t, slot k).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Protocol

import torch


def sort_by_expert(
    topk_ids_TK: torch.Tensor, num_experts: int, keep_dropped: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Order the kept assignments by expert.

    Returns `perm_N`, the flat assignment indices `t * K + k` whose id is not -1, sorted by expert ascending
    and, within an expert, by flat index (token order; the sort is stable), and `num_tokens_per_expert_E`.
    `keep_dropped`: return all T*K assignments, dropped ones last, instead of cutting those off: for callers that
    know nothing is dropped, since the cut reads the kept count on the host (a device sync).
    """
    ids_A = topk_ids_TK.reshape(-1)
    keys_A = torch.where(ids_A >= 0, ids_A, num_experts)  # dropped assignments sort last, then are cut
    perm_A = torch.sort(keys_A, stable=True).indices
    counts_E1 = torch.zeros(num_experts + 1, dtype=torch.long, device=ids_A.device)
    counts_E1.scatter_add_(0, keys_A, torch.ones_like(keys_A))
    if keep_dropped:
        return perm_A, counts_E1[:num_experts]
    num_kept = ids_A.numel() - int(counts_E1[num_experts])  # host sync: row count of the expert input
    return perm_A[:num_kept], counts_E1[:num_experts]


def take_rows(x_TD: torch.Tensor, index_N: torch.Tensor, max_repeats: int) -> torch.Tensor:
    """`x_TD[index_N]`, differentiable, where no row of x is taken more than `max_repeats` times.

    Backward sums the gradients of the rows taken from the same source row. At most two: `index_select`, whose
    backward (`index_add_`) is several times faster on the CPU than the advanced index's (`index_put_` with
    accumulate) and gives the same bits: the first addition, to zero, is exact, and one more addition rounds once
    whatever the order or the accumulation dtype. More: the advanced index, whose bits the golden curves hold
    (`index_add_` sums bf16 in fp32 and rounds once, and neither keeps the order across threads)."""
    if max_repeats <= 2:
        return x_TD.index_select(0, index_N)
    return x_TD[index_N]


def gather_rows(x_TD: torch.Tensor, perm_N: torch.Tensor, top_k: int) -> torch.Tensor:
    """The token copies `x_ND[n] = x_TD[perm_N[n] // K]` in expert order (a token's row at most K times)."""
    return take_rows(x_TD, perm_N // top_k, top_k)


class _WeightedSum(torch.autograd.Function):
    """`y_TD[t] = Σ w_N[n] · y_ND[n]` over the rows n with `token_N[n] == t`, summed in fp32, returned in y's dtype.

    The ops (and roundings) of `zeros.index_add_(0, token_N, y.float() * w[:, None]).to(y.dtype)` under autograd,
    both ways, but it saves only y in its own dtype, w and the index. Autograd's graph of those ops keeps two fp32
    N·D tensors (y's fp32 copy, which the product saves, and the product, which `index_add` saves though its
    backward reads only its shape): 8 bytes per element against y's own 2 under bf16 (4 in fp32), the largest
    activations of an MoE layer (`train/plan/activations.py`)."""

    @staticmethod
    def forward(ctx, y_ND: torch.Tensor, w_N: torch.Tensor, token_N: torch.Tensor, num_tokens: int) -> torch.Tensor:
        y_TD = torch.zeros(num_tokens, y_ND.shape[-1], dtype=torch.float32, device=y_ND.device)
        # y (bf16 or fp32) times the fp32 weights promotes to fp32: the product of y's fp32 copy, without the copy
        y_TD.index_add_(0, token_N, y_ND * w_N.float().unsqueeze(-1))
        ctx.save_for_backward(y_ND, w_N, token_N)
        return y_TD.to(y_ND.dtype)

    @staticmethod
    def backward(ctx, grad_TD: torch.Tensor):
        y_ND, w_N, token_N = ctx.saved_tensors
        g_ND = grad_TD.float().index_select(0, token_N)
        grad_y = (g_ND * w_N.unsqueeze(-1)).to(y_ND.dtype) if ctx.needs_input_grad[0] else None
        grad_w = (g_ND * y_ND).sum(-1) if ctx.needs_input_grad[1] else None  # fp32 (promoted), as in forward
        return grad_y, grad_w, None, None


def combine_rows(y_ND: torch.Tensor, perm_N: torch.Tensor, topk_weights_TK: torch.Tensor) -> torch.Tensor:
    """Inverse of `gather_rows`: `y_TD[t] = sum_k w[t, k] * y_ND[row of (t, k)]`, in y's dtype.

    Dropped assignments have no row and so contribute zero. Accumulates in fp32 because the K copies of a
    token are summed; keeps only y (in its dtype), the row weights and indices for backward (`_WeightedSum`).
    """
    T, K = topk_weights_TK.shape
    w_N = topk_weights_TK.reshape(-1).index_select(0, perm_N)
    return _WeightedSum.apply(y_ND, w_N, perm_N // K, T)


class TokenDispatcher(Protocol):
    """Contract shared by all dispatchers (see docs/ARCHITECTURE.md).

    `dispatch` receives this rank's tokens and routing and returns the rows this rank's experts must
    process, grouped by local expert ascending, with their counts. `may_drop=False` promises that no id is -1
    (a dropless plan), which lets a dispatcher skip work that finds the dropped ones. `combine` receives the
    expert outputs for exactly those rows and returns, for this rank's tokens, the gate-weighted sum over the K copies.
    `stats` holds detached statistics of the last call (at least `a2a_tokens_sent`). `combine(y, overlap)` calls
    `overlap()` exactly once, while its own communication is in flight where it has any (the shared expert).
    """

    stats: dict[str, Any]

    def dispatch(
        self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor, may_drop: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def combine(self, y_ND: torch.Tensor, overlap: Optional[Callable[[], None]] = None) -> torch.Tensor: ...


class LocalDispatcher:
    """Single-device dispatcher: all experts are local, so dispatch is a permutation and nothing is sent."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.stats: dict[str, Any] = {}
        self._perm_N: torch.Tensor | None = None
        self._topk_weights_TK: torch.Tensor | None = None

    def dispatch(
        self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor, may_drop: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns `(x_ND, num_tokens_per_local_expert_E)`; ids of -1 are dropped assignments. With
        `may_drop=False` (a dropless plan) N = T*K is known, so nothing waits for the host."""
        perm_N, num_tokens_per_expert_E = sort_by_expert(topk_ids_TK, self.num_experts, keep_dropped=not may_drop)
        self._perm_N, self._topk_weights_TK = perm_N, topk_weights_TK
        self.stats = {"a2a_tokens_sent": 0}
        return gather_rows(x_TD, perm_N, topk_ids_TK.shape[1]), num_tokens_per_expert_E

    def combine(self, y_ND: torch.Tensor, overlap: Optional[Callable[[], None]] = None) -> torch.Tensor:
        """Gate-weighted sum of each token's expert outputs, `y_TD`, for the tokens of the last dispatch.
        `overlap()` runs first (nothing is in flight here)."""
        if self._perm_N is None:
            raise RuntimeError("combine() called before dispatch()")
        if overlap is not None:
            overlap()
        y_TD = combine_rows(y_ND, self._perm_N, self._topk_weights_TK)
        self._perm_N = self._topk_weights_TK = None  # free the routing state; one combine per dispatch
        return y_TD
