"""Per-rank bytes of parameters, gradients and optimizer state that each engine will hold, by arithmetic: what
`TrainEngine.held_bytes()` measures (`parallel/memory.py`), predicted from tensor sizes alone (meta tensors work).

Inputs: the optimizer's parameter groups of ONE rank's model (experts already sharded to E/ep), which of those
parameters are routed experts, the world size W and the EP degree ep. Every weight is fp32 in every precision
(`precision=bf16` adds its bf16 compute copies to `params`: `train.plan.planner`).
  stage 0 (`LocalEngine`): whole parameters and gradients; AdamW's two moments and a step counter per tensor.
  stages 1-3 (DeepSpeed ZeRO, as 0.19.8 lays it out): DeepSpeed's groups are ours with the expert parameters split
    off into their own groups (at most 178,956,971 elements each); a dense group is partitioned over the W ranks,
    an expert group over the W/ep ranks of its EDP group. A partition holds the group's flat elements padded to a
    multiple of 2·dp, divided by dp. Optimizer = 2 moments + the fp32 master copy of the partition, each group a
    step counter.
  grads, the peak while gradients accumulate (what the step holds with activations still alive):
    stage 0 and 1: every local gradient whole (stage 1 reduces to its partition only at the step's boundary);
    stage 2: the whole gradients of the parameters overlapping the rank's partitions (DeepSpeed accumulates
      `all_grad_tensors` per parameter), computed from the flat layout, worst rank;
    stage 3: the gradient partition.
  stage 3 parameters: each tensor is partitioned on its own (ceil(numel/dp) elements); tensors under
    `stage3_param_persistence_threshold` elements (DeepSpeed's default 1e5) stay whole on every rank as well.
  pipeline stages at stage 1 (`parallel.zero1.PartitionedOptimizer`, not DeepSpeed): each parameter has one owner
    among the stage's ranks, the same greedy rule the engine runs (`assign_owners`: dense tensors over the stage's
    dp ranks, expert tensors over the EDP group, in `named_parameters()` order); a rank holds AdamW's two moments
    and step counter of the tensors it owns, no master copy (the parameters are the fp32 masters), and whole
    parameters and gradients (gradients are all-reduced whole, as at stage 0). Ranks differ by up to a tensor:
    `pipeline_zero1_bytes` gives each dp rank's.
Not counted here (see `transient_bytes`): communication buckets and ZeRO-3's gathered parameters.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from math import ceil
from typing import Iterable, Sequence

from parallel.mesh import Mesh

FP32 = 4
DS_MAX_EXPERT_GROUP = 178956971  # deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer
DS_PERSISTENCE_THRESHOLD = 100_000  # DeepSpeedZeroConfig.param_persistence_threshold default
NCCL_ALIGNMENT = 2  # DeepSpeedZeroOptimizer.nccl_start_alignment_factor


@dataclass(frozen=True)
class FlatGroup:
    """One DeepSpeed parameter group: element counts in order, and whether it is partitioned over EDP."""

    numels: tuple[int, ...]
    expert: bool


def deepspeed_groups(groups: Sequence[Sequence[int]], expert_flags: Sequence[Sequence[bool]],
                     ep_size: int) -> list[FlatGroup]:
    """Our optimizer groups (element counts, expert flags) as DeepSpeed regroups them: each group's dense part
    first, then (ep_size > 1) every group's expert parameters in chunks of at most DS_MAX_EXPERT_GROUP elements."""
    dense, experts = [], []
    for numels, flags in zip(groups, expert_flags):
        dense.append(FlatGroup(tuple(n for n, x in zip(numels, flags) if not x or ep_size == 1), False))
        if ep_size == 1:
            continue
        chunk, size = [], 0
        for n in (n for n, x in zip(numels, flags) if x):
            if chunk and size + n > DS_MAX_EXPERT_GROUP:
                experts.append(FlatGroup(tuple(chunk), True))
                chunk, size = [], 0
            chunk.append(n)
            size += n
        if chunk:
            experts.append(FlatGroup(tuple(chunk), True))
    return [g for g in dense + experts if g.numels]


def _partition(total: int, dp: int) -> int:
    """Elements per rank of a flat group of `total` elements padded to a multiple of 2·dp."""
    return ceil(total / (NCCL_ALIGNMENT * dp)) * NCCL_ALIGNMENT


def _overlap_bytes(group: FlatGroup, dp: int) -> list[int]:
    """For each dp rank: bytes of the whole tensors that overlap its partition of the flat group."""
    starts = [0]
    for n in group.numels:
        starts.append(starts[-1] + n)
    part = _partition(starts[-1], dp)
    out = []
    for r in range(dp):
        lo, hi = r * part, (r + 1) * part
        first = max(bisect.bisect_right(starts, lo) - 1, 0)
        last = min(bisect.bisect_left(starts, hi), len(group.numels))
        out.append(FP32 * sum(group.numels[first:last]) if lo < starts[-1] else 0)
    return out


def stage0_bytes(numels: Iterable[int]) -> dict:
    numels = list(numels)
    whole = FP32 * sum(numels)
    return {"params": whole, "grads": whole, "grads_partition": whole, "optimizer": 2 * whole + FP32 * len(numels)}


def zero_bytes(groups: list[FlatGroup], stage: int, world_size: int, ep_size: int,
               persistence_threshold: int = DS_PERSISTENCE_THRESHOLD) -> dict:
    """Per-rank bytes under ZeRO `stage` (1-3) for DeepSpeed's `groups` (see `deepspeed_groups`); `grads` is the
    peak while accumulating (worst rank), `grads_partition` what is left once reduced."""
    edp = Mesh(world_size=world_size, ep_size=ep_size).edp_size

    def dp(g: FlatGroup) -> int:
        return edp if g.expert else world_size

    numels = [n for g in groups for n in g.numels]
    if stage == 3:
        part = sum(ceil(n / dp(g)) for g in groups for n in g.numels)
        persistent = sum(n for n in numels if n < persistence_threshold)
        return {"params": FP32 * (part + persistent), "grads": FP32 * part, "grads_partition": FP32 * part,
                "optimizer": FP32 * (3 * part + len(groups))}
    part = sum(_partition(sum(g.numels), dp(g)) for g in groups)
    if stage == 1:
        grads = FP32 * sum(numels)
    else:  # world rank r is rank r of the dense groups and its mesh's edp_rank in its EDP group
        dense = [0] * world_size
        expert = [0] * edp
        for g in groups:
            for r, b in enumerate(_overlap_bytes(g, dp(g))):
                if g.expert:
                    expert[r] += b
                else:
                    dense[r] += b
        grads = max(dense[r] + expert[Mesh(rank=r, world_size=world_size, ep_size=ep_size).edp_rank]
                    for r in range(world_size))
    return {"params": FP32 * sum(numels), "grads": grads, "grads_partition": FP32 * part,
            "optimizer": FP32 * (3 * part + len(groups))}


def adamw_bytes(numels: Iterable[int]) -> int:
    """AdamW's state of whole tensors: two fp32 moments and an fp32 step counter each."""
    numels = list(numels)
    return 2 * FP32 * sum(numels) + FP32 * len(numels)


def pipeline_zero1_bytes(named: Sequence[tuple[int, bool]], dp_size: int, ep_size: int) -> dict:
    """A pipeline stage's bytes at ZeRO-1 from its trainable tensors (numel, is routed expert) in
    `named_parameters()` order: `optimizer` the worst dp rank's, `optimizer_by_dp_rank` each one's (module
    docstring)."""
    from parallel.zero1 import assign_owners

    dense = [n for n, x in named if not x]
    expert = [n for n, x in named if x]
    own_dense = assign_owners(dense, dp_size)
    own_expert = assign_owners(expert, dp_size // ep_size)
    per_rank = [adamw_bytes(n for n, k in zip(dense, own_dense) if k == r)
                + adamw_bytes(n for n, k in zip(expert, own_expert) if k == r // ep_size) for r in range(dp_size)]
    whole = FP32 * (sum(dense) + sum(expert))
    return {"params": whole, "grads": whole, "grads_partition": whole, "optimizer": max(per_rank),
            "optimizer_by_dp_rank": per_rank}


def state_bytes(groups: Sequence[Sequence[int]], expert_flags: Sequence[Sequence[bool]], stage: int,
                world_size: int, ep_size: int, persistence_threshold: int = DS_PERSISTENCE_THRESHOLD) -> dict:
    """Per-rank {params, grads, grads_partition, optimizer} bytes for `parallel.zero_stage=stage`, from one
    rank's optimizer groups (element counts) and which entries are routed-expert tensors."""
    if stage == 0:
        return stage0_bytes(n for numels in groups for n in numels)
    return zero_bytes(deepspeed_groups(groups, expert_flags, ep_size), stage, world_size, ep_size,
                      persistence_threshold)
