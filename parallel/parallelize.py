"""Expert parallelism applied to a built `MoETransformer` in place (`apply_expert_parallel`), and `materialize`:
the build pipeline's (`train/build.py`) steps of the parallel room.

Gradient scaling (why the trainer needs nothing but `reduce_gradients`). Let W = world size, and let rank r
compute its loss L_r on its own B/W sequences of the global batch exactly as the model defines it (means over
its own tokens; balance-term counts f are global through `count_reducer`, the probability terms P are means
over its own tokens, so every term is linear in per-token quantities). The reference loss on the global batch
is then L = (1/W) Σ_r L_r (equal tokens per rank; `lm_loss` is exact when every rank has the same number of
non-ignored labels). Each rank runs `L_r.backward()`:
  - a dense parameter's copy on rank r sees only rank r's tokens: grad_r = ∂L_r/∂θ, so the reference gradient
    is the MEAN over the world;
  - a local expert on rank r (EP group g) receives, through the reverse all-to-all, the gradient of every
    token of group g that was routed to it: grad_r = Σ_{s∈g} ∂L_s/∂θ_e. The same expert lives once in every
    EP group (the EDP group), so the reference gradient is (1/W) Σ_g Σ_{s∈g} ∂L_s/∂θ_e
    = SUM over the EDP group / W (= mean over EDP / ep_size).
With ep_size = 1 the EDP group is the world and the two rules coincide.

Not identical to the reference, by design: with `moe.capacity_factor` or `moe.device_capacity_factor` set,
capacity is computed from each rank's own tokens (per-rank capacity, as in GShard; for devices, each rank's share
of every device's budget), so drops differ from a single process on the global batch.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from parallel.activation_checkpointing import apply_activation_checkpointing
from parallel.dispatcher import AllToAllDispatcher
from parallel.mesh import Mesh, validate_parallel_config
from train.model.moe.experts import stacked_expert_tensors

class AllReduceSum:
    """`count_reducer` for MoE layers: before, each rank holds counts of its own tokens; after, every rank
    holds the sum over the whole world (the global batch), in the input's dtype."""

    def __init__(self, group=None):
        self.group = group

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def start(self, t: torch.Tensor) -> Callable[[], torch.Tensor]:
        """The same sum, launched asynchronously; the returned function waits for it and gives the result. The MoE
        layer starts it before its dispatch and waits after its combine, so the all-reduce is on the wire while
        the tokens are and costs no round of its own. Every rank starts and waits in the same order."""
        t = t.detach().clone()
        work = dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group, async_op=True)

        def wait() -> torch.Tensor:
            work.wait()
            return t

        return wait


class SumInDispatch(AllReduceSum):
    """`count_reducer` of an MoE layer whose EP group is all the ranks that run it (the world, or a pipeline stage):
    `start` hands the counts to the layer's dispatcher, whose counts exchange (which the dispatch makes anyway)
    carries them to every rank, so the sum costs no collective of its own. The layer starts it just before its
    dispatch (`MoELayer._count`). Called plainly (activation checkpointing records through a plain call), it is
    `AllReduceSum` over `group`."""

    def __init__(self, dispatcher: AllToAllDispatcher, group=None):
        super().__init__(group)
        self.dispatcher = dispatcher

    def start(self, t: torch.Tensor) -> Callable[[], torch.Tensor]:
        return self.dispatcher.sum_in_next_dispatch(t.detach().clone())


def _check_supported(model: nn.Module, cfg, mesh: Mesh) -> None:
    if cfg.parallel.ep_size != mesh.ep_size:
        raise ValueError(f"parallel.ep_size={cfg.parallel.ep_size} but the mesh was built with ep_size={mesh.ep_size}")
    validate_parallel_config(cfg, mesh.world_size)
    if not hasattr(model, "moe_layers"):
        raise TypeError(f"parallelize expects a model with moe_layers() (MoETransformer), got {type(model).__name__}")


def apply_expert_parallel(model: nn.Module, cfg, mesh: Mesh) -> nn.Module:
    """The build pipeline's expert-parallel step (`train/build.py`), in place on a built model (meta or
    materialised): for every MoE layer (main and MTP blocks) the stacked experts keep only this rank's
    E/ep_size experts (`GroupedExperts.shard` with the mesh's `expert_placement`, set once here; a materialised
    model is sliced, a meta one stays unallocated); an `AllToAllDispatcher` over the EP group moves tokens to
    their experts' ranks (the model's `LocalDispatcher` stays when ep_size = 1); `num_devices` = ep_size is the
    expert→device map of the device/communication balance terms, statistics and device capacity (routing counts
    the model's `moe.routing_groups`, whatever the layout); `count_reducer` sums balance counts over the whole
    world, so f terms and load statistics describe the global batch. Before: every rank holds the whole logical
    model. After: each rank holds its dense tensors and its own experts. No communication here; a mesh without
    process groups (the planner's) is enough as long as nothing runs a forward pass."""
    _check_supported(model, cfg, mesh)
    # counts sum over the ranks that run this layer: the world, or this stage's data-parallel ranks in a pipeline
    reducer = AllReduceSum(mesh.dp_group) if mesh.dp_size > 1 else None
    for _, layer in model.moe_layers():
        placement = mesh.expert_placement(layer.experts.placement.num_global_experts)
        layer.experts.shard(placement)
        if mesh.ep_size > 1:
            layer.dispatcher = AllToAllDispatcher(mesh.ep_group, placement, fp8=cfg.parallel.a2a_dtype == "fp8",
                                                  overlap=cfg.parallel.overlap)
        layer.num_devices = placement.ep_size
        if mesh.ep_size > 1 and mesh.ep_size == mesh.dp_size:  # the EP group is the stage: sum in its exchange
            layer.count_reducer = SumInDispatch(layer.dispatcher, mesh.dp_group)
        elif reducer is not None:
            layer.count_reducer = reducer
    return model


def parallelize(model: nn.Module, cfg, mesh: Mesh, init_seed: Optional[int] = None) -> nn.Module:
    """Expert parallelism, activation checkpointing and (for a meta model) materialisation, in the build
    pipeline's order, for a model some test has already built; in place, returns the model. Runs and tools
    build through `train.build.build_model`, which calls these steps itself (with the model converters before
    them and weight loading, compile and the engine after).
    A model that is already materialised (every rank built the whole model) is sliced instead. Gradients are
    made equal to the single-process reference by `reduce_gradients` (scaling derived in this module's
    docstring)."""
    apply_expert_parallel(model, cfg, mesh)
    apply_activation_checkpointing(model, cfg.trainer.activation_checkpointing)  # wraps whatever dispatcher is installed
    if any(p.is_meta for p in model.parameters()):
        materialize(model, mesh.device, init_seed)
    return model


def materialize(model: nn.Module, device, init_seed: Optional[int]) -> None:
    """Allocate a (sharded) meta-device model's tensors on `device` and initialise them from `init_seed`: each
    logical tensor, and each expert of a stacked one, from its own seed (`MoETransformer.init_weights`), so the
    shards of any layout equal the single-process model's tensors from the same seed."""
    if init_seed is None:
        raise ValueError("the model is on the meta device; pass init_seed (train.model.draw_init_seed()) so its "
                         "tensors can be initialised once allocated")
    model.to_empty(device=device)
    model.init_weights(init_seed)


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The routed-expert weights of every MoE layer (this rank's experts, `GroupedExperts.placement`), in
    `model.named_parameters()` order."""
    names = stacked_expert_tensors(model)
    return [p for n, p in model.named_parameters() if n in names]
