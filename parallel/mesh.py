"""Process groups for pipeline parallelism (PP) × expert parallelism (EP) × expert-data parallelism (EDP).

Rank layout. The world of W = ep_size × edp_size ranks is a 2-D grid whose expert-parallel axis is the
fast one, so the ranks that exchange tokens every MoE layer are adjacent (on one node when ep_size ≤ GPUs
per node, where the all-to-all runs over NVLink):

    EP group g   = ranks [g·ep, (g+1)·ep)            (g = 0 .. edp_size-1)  — exchange tokens (all-to-all)
    EDP group j  = ranks {j, j+ep, j+2·ep, ...}       (j = 0 .. ep_size-1)   — hold the same experts
    rank r: ep_rank = r % ep, edp_rank = r // ep; it owns the routed experts of `ExpertPlacement(E, ep, ep_rank)`

    W=4, ep=2:   EP groups {0,1} {2,3}    EDP groups {0,2} {1,3}

Every rank reads its own slice of the global batch (`dp_size == world_size`): expert parallelism splits the
experts, never the data. Dense parameters are replicated on all W ranks. The rank lists of both kinds of group
are computed here only (`ep_group_ranks`, `edp_group_ranks`): `build_mesh` creates the groups from them and the
ZeRO glue hands the same lists to DeepSpeed.

With pipeline parallelism (`parallel.pp_size` = P > 1) the stage is the slowest axis, as in Megatron and
torchtitan: stage s holds ranks [s·S, (s+1)·S) with S = W/P, and inside a stage the grid above applies to the
stage's S ranks (its EP and EDP groups, offset by s·S). `dp_group` is the stage's S ranks (they hold the same
dense parameters and read different data: dp_size = S, dp_rank = r mod S); `pp_group` is the P ranks
{r mod S + s·S} that pass activations along one pipeline (they read the same data).

    W=4, P=2, ep=1:  stages {0,1} {2,3}   pipelines {0,2} {1,3}
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from train.model.moe.placement import ExpertPlacement


@dataclass
class Mesh:
    """What this rank needs to know about the parallel layout. The defaults are the single-process mesh."""

    rank: int = 0
    world_size: int = 1
    ep_size: int = 1
    ep_rank: int = 0
    ep_group: Optional[dist.ProcessGroup] = None  # the ep_size ranks this rank exchanges tokens with
    edp_group: Optional[dist.ProcessGroup] = None  # the edp_size ranks that hold the same experts
    device: torch.device = torch.device("cpu")
    pp_size: int = 1
    pp_rank: int = 0
    pp_group: Optional[dist.ProcessGroup] = None  # the pp_size ranks of this rank's pipeline (one per stage)
    dp_group: Optional[dist.ProcessGroup] = None  # this stage's dp_size ranks; None = the world (pp_size 1)
    embed_group: Optional[dist.ProcessGroup] = None  # first and last stage of this pipeline (their embeddings)

    @property
    def dp_size(self) -> int:
        """Data-parallel degree: the ranks of a stage, each reading its own slice of the global batch (the whole
        world without pipelining)."""
        return self.world_size // self.pp_size

    @property
    def dp_rank(self) -> int:
        """Which slice of the global batch this rank reads (the ranks of one pipeline read the same)."""
        return self.rank % self.dp_size

    @property
    def edp_size(self) -> int:
        return self.dp_size // self.ep_size

    @property
    def edp_rank(self) -> int:
        return self.dp_rank // self.ep_size

    @property
    def stage_offset(self) -> int:
        """World rank of this stage's first rank (0 without pipelining)."""
        return self.pp_rank * self.dp_size

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def ep_group_ranks(self) -> list[int]:
        """World ranks of this rank's EP group, in EP-rank order."""
        return ep_group_ranks(self.edp_rank, self.dp_size, self.ep_size, self.stage_offset)

    def edp_group_ranks(self) -> list[int]:
        """World ranks of this rank's EDP group (the replicas of its experts), in EDP-rank order."""
        return edp_group_ranks(self.ep_rank, self.dp_size, self.ep_size, self.stage_offset)

    def pp_group_ranks(self) -> list[int]:
        """World ranks of this rank's pipeline, in stage order."""
        return pp_group_ranks(self.dp_rank, self.world_size, self.pp_size)

    def expert_placement(self, num_experts: int) -> ExpertPlacement:
        """Where a layer's `num_experts` routed experts live in this layout, seen from this rank."""
        return ExpertPlacement(num_experts, self.ep_size, self.ep_rank)


def ep_group_ranks(g: int, world_size: int, ep_size: int, offset: int = 0) -> list[int]:
    """World ranks of EP group g (they exchange tokens) of `world_size` ranks starting at `offset` (a stage's):
    offset + [g·ep, (g+1)·ep)."""
    return list(range(offset + g * ep_size, offset + (g + 1) * ep_size))


def edp_group_ranks(j: int, world_size: int, ep_size: int, offset: int = 0) -> list[int]:
    """World ranks of EDP group j (they hold the experts of EP rank j) of `world_size` ranks starting at
    `offset`: offset + {j, j+ep, j+2·ep, ...}."""
    return list(range(offset + j, offset + world_size, ep_size))


def pp_group_ranks(j: int, world_size: int, pp_size: int) -> list[int]:
    """World ranks of pipeline j (data-parallel rank j of every stage): {j, j+S, j+2·S, ...}, S = W/P."""
    return list(range(j, world_size, world_size // pp_size))


def _launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "RANK" in os.environ


def _pick_backend(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    return "nccl" if device.type == "cuda" else "gloo"


def validate_parallel_config(cfg, world_size: int) -> None:
    """Raise a ValueError naming the offending field (and how to fix it) for an impossible layout.

    The one implementation of these rules: the trainer's config validation calls it before any process group
    exists, and `init_distributed` / `parallelize` call it again for callers that skip that validation.
    """
    ep = cfg.parallel.ep_size
    if ep < 1:
        raise ValueError(f"parallel.ep_size={ep} must be >= 1")
    if world_size % ep != 0:
        raise ValueError(
            f"parallel.ep_size={ep} does not divide the world size {world_size}: pick an ep_size that divides it "
            f"(e.g. parallel.ep_size={_largest_divisor(world_size, ep)})"
        )
    moe = cfg.model.moe
    n = moe.num_routed_experts
    if n % ep != 0:
        raise ValueError(
            f"model.moe.num_routed_experts={n} (num_experts={moe.num_experts}, granularity={moe.granularity}) is "
            f"not divisible by parallel.ep_size={ep}: choose an ep_size that divides {n}"
        )
    # No rule ties model.moe.device_limit to ep_size: it counts the model's routing groups, which need not be
    # this layout's devices (train/config/routing.py; the trainer checks them).


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def _resolve_device(cfg, local_rank: int) -> torch.device:
    want = cfg.trainer.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(want)


def build_mesh(rank: int, world_size: int, ep_size: int, device: torch.device,
               timeout: Optional[timedelta] = None, pp_size: int = 1) -> Mesh:
    """Create the EP and EDP groups, and with `pp_size` > 1 the stage (data-parallel) and pipeline groups
    (collective: every rank calls it with the same sizes).

    `dist.new_group` must be entered by all ranks for every group in the same order, so each rank creates all
    groups and keeps its own. `timeout` bounds their collectives (None: torch's default; new groups do not
    inherit the default group's).
    """
    S = world_size // pp_size
    mesh = Mesh(rank=rank, world_size=world_size, ep_size=ep_size, ep_rank=(rank % S) % ep_size, device=device,
                pp_size=pp_size, pp_rank=rank // S)
    for s in range(pp_size):
        for g in range(S // ep_size):
            grp = dist.new_group(ep_group_ranks(g, S, ep_size, s * S), timeout=timeout)
            if (mesh.pp_rank, mesh.edp_rank) == (s, g):
                mesh.ep_group = grp
        for j in range(ep_size):
            grp = dist.new_group(edp_group_ranks(j, S, ep_size, s * S), timeout=timeout)
            if (mesh.pp_rank, mesh.ep_rank) == (s, j):
                mesh.edp_group = grp
    if pp_size > 1:
        for s in range(pp_size):
            grp = dist.new_group(list(range(s * S, (s + 1) * S)), timeout=timeout)
            if mesh.pp_rank == s:
                mesh.dp_group = grp
        for j in range(S):
            ranks = pp_group_ranks(j, world_size, pp_size)
            grp = dist.new_group(ranks, timeout=timeout)
            ends = dist.new_group([ranks[0], ranks[-1]], timeout=timeout)
            if mesh.dp_rank == j:
                mesh.pp_group = grp
                if mesh.pp_rank in (0, pp_size - 1):
                    mesh.embed_group = ends
    return mesh


def init_distributed(cfg, timeout_s: Optional[float] = None) -> Mesh:
    """Start the default process group when launched by torchrun and build the EP × EDP mesh.

    Before: torchrun has set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT (or nothing, for a
    single process). After: the default group spans all ranks (backend `parallel.backend`; auto = nccl on
    CUDA, gloo on CPU), this rank's device is selected, and the returned `Mesh` holds its EP and EDP groups.
    A single process gets the trivial mesh and no process group. An already-initialised default group (tests,
    notebooks) is reused. `timeout_s` bounds every collective's wait (None: torch's default); the trainer passes
    the hang watchdog's longest allowance (train/trainer/watchdog.py), so a rank that never arrives ends the wait.
    """
    if not (_launched_by_torchrun() or dist.is_initialized()):
        validate_parallel_config(cfg, 1)
        return Mesh(device=_resolve_device(cfg, 0))

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _resolve_device(cfg, local_rank)
    timeout = None if timeout_s is None else timedelta(seconds=timeout_s)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=_pick_backend(cfg.parallel.backend, device), timeout=timeout)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    validate_parallel_config(cfg, world_size)
    if world_size == 1:
        return Mesh(device=device)
    return build_mesh(rank, world_size, cfg.parallel.ep_size, device, timeout, pp_size=cfg.parallel.pp_size)


def barrier(mesh: Mesh) -> None:
    """Block until every rank arrives (no-op on one process)."""
    if mesh.world_size > 1:
        dist.barrier()


def broadcast_object(obj, mesh: Mesh):
    """Before: rank 0 holds `obj` (picklable). After: every rank returns rank 0's `obj`."""
    if mesh.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj, mesh: Mesh) -> list:
    """Before: each rank holds its own `obj` (picklable). After: every rank returns [rank 0's, rank 1's, ...]."""
    if mesh.world_size == 1:
        return [obj]
    out = [None] * mesh.world_size
    dist.all_gather_object(out, obj)
    return out


def shutdown(mesh: Mesh) -> None:
    """Destroy the default process group if one exists (safe to call on one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
