"""Reductions of non-differentiable statistics (losses, counts, flags) over every rank of the mesh.

The one place the trainer's statistics meet a collective: a SUM (metrics, bias-update loads, the preemption
flag) or a MAX (metrics that report the worst rank). Gradients have their own bucketed reduction
(`parallel/grads.py`), and the MoE layer's count reducer sums over the data-parallel world inside the forward.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


def all_reduce_stats(tensor: torch.Tensor, mesh, op: str = "sum", over: str = "world") -> torch.Tensor:
    """Before: each rank holds its own statistics. After: the returned tensor holds their elementwise `op`
    (`sum` | `max`) over every rank of `mesh` (`over="world"`) or over this pipeline stage's data-parallel ranks
    (`over="stage"`: statistics of layers only this stage holds, such as the expert loads behind the bias update;
    the world when there is no pipeline), on every rank; the input is left as it was (returned as is on one
    process)."""
    if op not in _OPS:
        raise ValueError(f"op must be one of {sorted(_OPS)}, got {op!r}")
    if over not in ("world", "stage"):
        raise ValueError(f"over must be 'world' or 'stage', got {over!r}")
    size, group = (mesh.world_size, None) if over == "world" else (mesh.dp_size, mesh.dp_group)
    if size == 1:
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=_OPS[op], group=group)
    return out
