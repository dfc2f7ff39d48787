"""The few collectives the trainer needs beyond `parallel`'s API, for CPU and GPU alike.

`parallel.all_reduce_stats` (a sum over every rank) is the only reduction used for statistics: a max over
ranks is a sum of one-hot rows, so no second primitive is needed. `barrier` prefers `parallel.barrier` and
falls back to the default process group (only ever used when one exists).
"""
from __future__ import annotations

import torch

import parallel


def barrier(mesh) -> None:
    """Block until every rank arrives (no-op on one process)."""
    fn = getattr(parallel, "barrier", None)
    if fn is not None:
        fn(mesh)
        return
    if mesh.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def sum_over_ranks(values_N: torch.Tensor, mesh) -> torch.Tensor:
    """Elementwise sum of a float64 vector over ranks (identity on one process)."""
    return parallel.all_reduce_stats(values_N, mesh)


def max_over_ranks(values_N: torch.Tensor, mesh) -> torch.Tensor:
    """Elementwise max over ranks, as a sum of a (world, N) matrix in which each rank fills its own row."""
    if mesh.world_size == 1:
        return values_N
    rows_WN = values_N.new_zeros(mesh.world_size, values_N.numel())
    rows_WN[mesh.rank] = values_N
    return parallel.all_reduce_stats(rows_WN, mesh).amax(dim=0)


def broadcast_object(obj, mesh):
    """Rank 0's `obj` on every rank (identity on one process)."""
    fn = getattr(parallel, "broadcast_object", None)
    if fn is not None:
        return fn(obj, mesh)
    if mesh.world_size == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown(mesh) -> None:
    """Tear down the default process group if this process started one."""
    fn = getattr(parallel, "shutdown", None)
    if fn is not None:
        fn(mesh)
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
