"""The one reduction the trainer needs beyond `parallel`'s API: an elementwise max over ranks.

`parallel.all_reduce_stats` (a sum over every rank) stays the only collective: a max over ranks is the max of
a (world, N) sum in which each rank fills its own row.
"""
from __future__ import annotations

import torch

import parallel


def max_over_ranks(values_N: torch.Tensor, mesh) -> torch.Tensor:
    """Elementwise max over ranks (identity on one process)."""
    if mesh.world_size == 1:
        return values_N
    rows_WN = values_N.new_zeros(mesh.world_size, values_N.numel())
    rows_WN[mesh.rank] = values_N
    return parallel.all_reduce_stats(rows_WN, mesh).amax(dim=0)
