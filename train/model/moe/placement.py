"""`ExpertPlacement`: which expert-parallel rank holds which routed experts; the one place that rule lives.

Shape legend: T tokens, K routed experts per token (ids of -1 = dropped), E routed experts (global), R EP ranks.

The rule: experts are split into R contiguous blocks of E/R, EP rank r holds block r, i.e. global experts
[r·E/R, (r+1)·E/R), and global expert e is local expert e - r·E/R there. With R = 1 (`whole`) one rank holds all.
The same arithmetic is the layer's expert→device map (G devices = R blocks) for the device balance terms,
device capacity and per-device statistics, which build an `ExpertPlacement(E, G)` for it.

Pure arithmetic: no process group (the model never imports torch.distributed). `GroupedExperts` declares one
(`whole` by default) and `parallel.parallelize` sets it once (`GroupedExperts.shard`); every other piece of code
(dispatchers, capacity, balance terms, state dicts, sharded checkpoints, gradient reduction, ZeRO glue, the memory
planner) asks the experts' placement, or builds one from the config, instead of re-deriving the rule.

Why not DTensor placements (`[Replicate(), Shard(0)]` over an (edp, ep) mesh, as torchtitan does): they would say
the same, but the expert weights must stay plain local tensors here. DeepSpeed ZeRO (0.19.8) flattens and partitions
`param.data` into its own flat buffers (`_flatten_dense_tensors`) and tags experts by attributes, and its AutoEP
removed its DTensor code paths; the dispatcher and `torch._grouped_mm` work on local tensors; the sharded checkpoint
keys are per-expert logical names (`model/NAME/expert/e`), readable without a mesh; and a meta-built model is sliced
before it is materialised, which needs no DeviceMesh (the model code may not know process groups at all).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertPlacement:
    """The routed experts of one layer as laid out over `ep_size` expert-parallel ranks, seen from `ep_rank`.

    `num_global_experts` E (all of the layer's routed experts), `ep_size` R, `ep_rank` r: this rank holds the
    `num_local_experts` = E/R experts `local_range` = [r·E/R, (r+1)·E/R), stacked in that order."""

    num_global_experts: int
    ep_size: int = 1
    ep_rank: int = 0

    def __post_init__(self) -> None:
        E, R = self.num_global_experts, self.ep_size
        if E < 1 or R < 1:
            raise ValueError(f"an expert placement needs at least one expert and one rank, got "
                             f"model.moe.num_experts={E} (routed, after granularity), parallel.ep_size={R}")
        if E % R != 0:
            raise ValueError(f"model.moe.num_experts={E} routed experts (after granularity) are not divisible by "
                             f"parallel.ep_size={R}: every EP rank must hold the same number of experts; "
                             f"choose an ep_size that divides {E}")
        if not 0 <= self.ep_rank < R:
            raise ValueError(f"ep_rank={self.ep_rank} is outside parallel.ep_size={R}")

    @classmethod
    def whole(cls, num_experts: int) -> "ExpertPlacement":
        """One rank holds every expert (the model as built, and every layout with ep_size 1)."""
        return cls(num_experts, 1, 0)

    def on_rank(self, ep_rank: int) -> "ExpertPlacement":
        """The same layout seen from another EP rank."""
        return ExpertPlacement(self.num_global_experts, self.ep_size, ep_rank)

    @property
    def num_local_experts(self) -> int:
        """Experts per EP rank, E/R."""
        return self.num_global_experts // self.ep_size

    @property
    def is_whole(self) -> bool:
        return self.ep_size == 1

    def start_of(self, ep_rank):
        """First global expert of EP rank `ep_rank` (an int or an integer tensor of ranks)."""
        return ep_rank * self.num_local_experts

    @property
    def local_start(self) -> int:
        """First global expert held by this rank."""
        return self.start_of(self.ep_rank)

    @property
    def local_range(self) -> range:
        """The global experts held by this rank, in their stacked order."""
        return range(self.local_start, self.local_start + self.num_local_experts)

    def owner(self, expert: int) -> int:
        """EP rank that holds global expert `expert`."""
        if not 0 <= expert < self.num_global_experts:
            raise IndexError(f"expert {expert} is outside the layer's {self.num_global_experts} experts")
        return expert // self.num_local_experts

    def is_local(self, expert: int) -> bool:
        return self.owner(expert) == self.ep_rank

    def to_local(self, expert: int) -> int:
        """Index of global expert `expert` in the stack of the rank that holds it."""
        return expert - self.start_of(self.owner(expert))

    def owner_of(self, ids: torch.Tensor, dropped: int = -1) -> torch.Tensor:
        """Vectorised `owner`: the EP rank of every expert id in `ids` (any shape, e.g. `topk_ids_TK`), and
        `dropped` where the id is -1 (no expert)."""
        return torch.where(ids >= 0, ids // self.num_local_experts, dropped)

    def sum_per_rank(self, x_E: torch.Tensor) -> torch.Tensor:
        """(..., E) per-expert values → (..., R): each EP rank's total over the experts it holds."""
        return x_E.unflatten(-1, (self.ep_size, self.num_local_experts)).sum(-1)
