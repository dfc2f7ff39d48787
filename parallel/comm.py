"""Differentiable collectives used by the expert-parallel dispatcher.

`all_to_all(tensors, out_splits, in_splits, group)` exchanges several row-major tensors with the same split
sizes in ONE autograd node. One node matters: every rank of the group must enter the backward collectives in
the same order, and a single node for (tokens, gate weights, expert ids) fixes that order, whatever order the
autograd engine would choose among separate nodes. Gradients of tensors that require none are not sent back.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist


def _exchange(tensors, out_splits, in_splits, group):
    outs, works = [], []
    for t in tensors:
        out = t.new_empty((sum(out_splits),) + tuple(t.shape[1:]))
        works.append(dist.all_to_all_single(out, t.contiguous(), out_splits, in_splits, group=group, async_op=True))
        outs.append(out)
    for w in works:
        w.wait()
    return outs


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out_splits, in_splits, group, *tensors):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        outs = _exchange(tensors, out_splits, in_splits, group)
        for t, o in zip(tensors, outs):
            if not t.is_floating_point():
                ctx.mark_non_differentiable(o)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        # reverse exchange: what came from rank s goes back to rank s
        need = [i for i, n in enumerate(ctx.needs_input_grad[3:]) if n]
        back = _exchange([grads[i] for i in need], ctx.in_splits, ctx.out_splits, ctx.group)
        result = [None] * len(grads)
        for i, g in zip(need, back):
            result[i] = g
        return (None, None, None, *result)


def all_to_all(tensors: Sequence[torch.Tensor], out_splits: list[int], in_splits: list[int],
               group) -> tuple[torch.Tensor, ...]:
    """Row all-to-all within `group` with uneven splits, differentiable.

    Before: each rank holds tensors whose first `in_splits[s]` rows (in order) go to group rank s.
    After: each rank holds tensors of `sum(out_splits)` rows, `out_splits[s]` of them from group rank s, in
    rank order. Backward sends gradients back along the reverse route.
    """
    return _AllToAll.apply(list(out_splits), list(in_splits), group, *tensors)


def exchange_counts(send_counts_R: torch.Tensor, group) -> torch.Tensor:
    """Each rank holds how many rows it will send to every group rank; returns how many it will receive."""
    recv = torch.empty_like(send_counts_R)
    dist.all_to_all_single(recv, send_counts_R.contiguous(), group=group)
    return recv
