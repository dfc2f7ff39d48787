"""ZeRO stage 1 for pipeline stages: the optimizer state of a stage is partitioned over its data-parallel ranks.

Why our own and not DeepSpeed's: DeepSpeed's ZeRO optimizers are driven by its engine's `backward()` and its
own gradient hooks, while a pipeline's backward runs inside torch.distributed.pipelining's schedule; torch's
`ZeroRedundancyOptimizer` partitions over one process group, and a stage has two (dense parameters are replicated
over the stage's data-parallel ranks, each expert only over its expert-data-parallel group). What ZeRO-1 needs
beyond plain data parallelism is small: an owner per parameter, an optimizer over the owned ones, and a broadcast
of each updated parameter from its owner.

Owners: parameters in `named_parameters()` order go to the least-loaded rank (by elements) of their group, the
lowest index on ties (the same on every rank); dense ones over `mesh.dp_group`, expert ones over `mesh.edp_group`.
Gradients are still all-reduced (`reduce_gradients`) and clipped as without ZeRO, so the update equals stage 0's.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from parallel.mesh import Mesh, gather_objects
from train.model.moe.experts import stacked_expert_tensors


def assign_owners(numels: Sequence[int], size: int) -> list[int]:
    """The owning index in [0, size) of each tensor of `numels` elements, in order: the least-loaded index so far
    (by elements), the lowest on ties. Pure arithmetic, so the memory planner (`train.plan.state`) assigns alike."""
    load = [0] * size
    owners = []
    for n in numels:
        k = min(range(size), key=lambda i: (load[i], i))
        owners.append(k)
        load[k] += n
    return owners


def _assign(params: list[tuple[str, nn.Parameter]], size: int) -> dict[str, int]:
    """name → owning index in [0, size) (`assign_owners`)."""
    return dict(zip((n for n, _ in params), assign_owners([p.numel() for _, p in params], size)))


class PartitionedOptimizer:
    """The optimizer of the parameters this rank owns, and the broadcasts that give every rank the update.
    Exposes `param_groups` (the learning-rate schedule sets them), `state`, `step()` and `zero_grad()`."""

    def __init__(self, model: nn.Module, param_groups: list[dict], optimizer_cls, mesh: Mesh):
        self.model, self.mesh = model, mesh
        experts = stacked_expert_tensors(model)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        dense = [(n, p) for n, p in named if n not in experts]
        expert = [(n, p) for n, p in named if n in experts]
        stage = list(range(mesh.stage_offset, mesh.stage_offset + mesh.dp_size))
        # name → (world rank of the owner, group to broadcast over)
        self.source: dict[str, tuple[int, object]] = {}
        for n, k in _assign(dense, mesh.dp_size).items():
            self.source[n] = (stage[k], mesh.dp_group)
        edp = mesh.edp_group_ranks()
        for n, k in _assign(expert, len(edp)).items():
            self.source[n] = (edp[k], mesh.edp_group)
        self.params = dict(named)
        owned = {id(self.params[n]) for n, (src, _) in self.source.items() if src == mesh.rank}
        groups = [{**g, "params": [p for p in g["params"] if id(p) in owned]} for g in param_groups]
        self.optimizer = optimizer_cls(groups)
        self.owned_names = [n for n in self.params if id(self.params[n]) in owned]

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def is_owned(self, name: str) -> bool:
        return self.source[name][0] == self.mesh.rank

    @torch.no_grad()
    def step(self) -> None:
        """Update the owned parameters, then every rank receives every update from its owner (one flat broadcast
        per owner and group)."""
        self.optimizer.step()
        by_source: dict[tuple[int, int], list[torch.Tensor]] = {}
        order: list[tuple[int, object]] = []
        for n, (src, group) in self.source.items():
            key = (src, id(group))
            if key not in by_source:
                by_source[key] = []
                order.append((src, group))
            by_source[key].append(self.params[n].data)
        for src, group in order:
            tensors = by_source[(src, id(group))]
            flat = _flatten_dense_tensors(tensors)
            dist.broadcast(flat, src=src, group=group)
            if src != self.mesh.rank:
                for t, new in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
                    t.copy_(new)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.model.zero_grad(set_to_none=set_to_none)  # every parameter's gradient, owned or not

    def export_state(self) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        """Collective over the world: (name, {"param", state kinds...}) for every parameter in order, the state
        broadcast from its owner (what a checkpoint writes, on whichever rank writes it)."""
        own = {n: {k: (tuple(v.shape), v.dtype, v.device.type) for k, v in self.optimizer.state.get(p, {}).items()}
               for n, p in self.params.items() if self.is_owned(n)}
        layout: dict = {}
        for part in gather_objects(own, self.mesh):
            layout.update(part)
        for n, p in self.model.named_parameters():
            if n not in self.source:
                yield n, {"param": p.detach()}
                continue
            src, group = self.source[n]
            states = {}
            mine = self.optimizer.state.get(p, {}) if self.is_owned(n) else {}
            for kind, (shape, dtype, where) in layout[n].items():
                t = mine[kind].to(self.mesh.device) if kind in mine else torch.empty(shape, dtype=dtype,
                                                                                    device=self.mesh.device)
                dist.broadcast(t, src=src, group=group)
                states[kind] = t.cpu() if where == "cpu" else t
            yield n, {"param": p.detach(), **states}

    def import_state(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        """Keep the owned parameters' state of a checkpoint batch (every rank is given every parameter's)."""
        for name, kinds in states.items():
            if name in self.source and self.is_owned(name):
                p = self.params[name]
                self.optimizer.state[p] = {k: (v.to(p.device) if v.dim() else v.clone()) for k, v in kinds.items()}

