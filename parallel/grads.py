"""Gradient reduction, clipping and statistics over the EP × EDP mesh (see `parallel/mesh.py`).

Scaling (derived in `parallel/parallelize.py`): dense gradients are averaged over the world; expert gradients
are summed over the expert-data-parallel group and divided by the world size, because a local expert's
gradient already sums the contributions of all tokens of its EP group. With pipeline parallelism "the world"
is the stage's data-parallel ranks (`mesh.dp_group`, `mesh.dp_size`): each stage reduces its own parameters,
and the clipping norm sums the stages' squares over the pipeline group.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from parallel.mesh import Mesh
from train.model.moe.experts import stacked_expert_tensors

BUCKET_BYTES = 32 * 1024 * 1024  # the default of `parallel.bucket_mb`


def _split_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(dense, expert) trainable parameters, expert = the stacked weights of `GroupedExperts` modules (this rank's
    experts); a missing gradient becomes zeros so that every rank reduces the same bucket layout (a None on one
    rank and a tensor on another would corrupt the collective)."""
    expert_names = stacked_expert_tensors(model)
    dense, expert = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        (expert if name in expert_names else dense).append(p)
    return dense, expert


def _buckets(params: list[nn.Parameter], bucket_bytes: int):
    """Consecutive runs of same dtype/device gradients of at most `bucket_bytes` (a single larger one alone)."""
    bucket, size = [], 0
    for p in params:
        g = p.grad
        nbytes = g.numel() * g.element_size()
        if bucket and (size + nbytes > bucket_bytes or g.dtype != bucket[0].dtype or g.device != bucket[0].device):
            yield bucket
            bucket, size = [], 0
        bucket.append(g)
        size += nbytes
    if bucket:
        yield bucket


def _all_reduce_grads(params: list[nn.Parameter], group, scale: float, bucket_bytes: int) -> None:
    for grads in _buckets(params, bucket_bytes):
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat.mul_(scale)
        for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(reduced)


@torch.no_grad()
def reduce_gradients(model: nn.Module, mesh: Mesh, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Before: each rank holds the gradients of its own loss (dense: its tokens; experts: its EP group's tokens
    routed to its experts). After: every rank holds the gradient of the reference loss on the global batch —
    dense gradients identical on all ranks, each expert's gradient identical across its EDP group."""
    if mesh.dp_size == 1:
        return
    dense, expert = _split_params(model)
    _all_reduce_grads(dense, mesh.dp_group, 1.0 / mesh.dp_size, bucket_bytes)
    _all_reduce_grads(expert, mesh.edp_group, 1.0 / mesh.dp_size, bucket_bytes)


def _sum_sq(params: list[nn.Parameter]) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    norms = torch._foreach_norm(grads, 2.0)
    return torch.stack([n.float() for n in norms]).square().sum()


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, mesh: Mesh, copies: frozenset[str] = frozenset()
                    ) -> torch.Tensor:
    """Clip by the norm of the FULL (logical) gradient; call after `reduce_gradients`.

    Before: dense gradients replicated, expert gradients sharded over the EP group (and, with pipelining, each
    stage's parameters on its own stage). The global norm is sqrt(‖dense‖² + Σ over the EP group of ‖local
    experts‖², summed over the stages), the same on every rank, and equals `torch.nn.utils.clip_grad_norm_` on
    the unsharded reference. `copies`: names of parameters that an earlier stage also holds (the embedding that
    the last stage's MTP modules or tied head use), counted there only. After: every gradient scaled by
    min(1, max_norm / (norm + 1e-6)). Returns the norm (before clipping).
    """
    dense, expert = _split_params(model) if mesh.world_size > 1 else (list(model.parameters()), [])
    counted = {id(p) for n, p in model.named_parameters() if n not in copies} if copies else None
    dense = [p for p in dense if p.grad is not None]
    device = dense[0].grad.device if dense else mesh.device
    dense_sq = _sum_sq([p for p in dense if counted is None or id(p) in counted]).to(device)
    expert_sq = _sum_sq(expert).to(device)
    if mesh.ep_size > 1:
        dist.all_reduce(expert_sq, op=dist.ReduceOp.SUM, group=mesh.ep_group)
    total_sq = dense_sq + expert_sq
    if mesh.pp_size > 1:
        dist.all_reduce(total_sq, op=dist.ReduceOp.SUM, group=mesh.pp_group)
    total = total_sq.sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    grads = [p.grad for p in (*dense, *expert)]
    if grads and math.isfinite(max_norm):
        torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    return total
