"""What DeepSpeed needs before `deepspeed.initialize` sees a moeforge model (facts: shared/notes/deepspeed.md).

DeepSpeed 0.19.8 only recognises experts that live in its own `MoE` class or in AutoEP layers. moeforge's experts
are stacked tensors sharded by `parallel.parallelize`, so this module tells DeepSpeed about them without changing
the model's computation:
- `import_deepspeed()`: import it without the C++ shared-memory comm op it would compile at start-up on CPU;
- `adopt_mesh_groups(mesh)`: write the mesh's EP and EDP groups into DeepSpeed's group tables, so DeepSpeed and
  the dispatcher share one set of communicators (DeepSpeed then creates no expert groups of its own);
- `tag_expert_params(model, mesh, stage)`: mark the routed-expert tensors as expert parameters of group
  `ep_size_{ep}` (reduced over their EDP group only); at stage 3 also with the placement attributes that make
  ZeRO-3 partition them over their EDP group instead of the world;
- `ExpertMarker`: a parameter-free `deepspeed.moe.layer.MoE` subclass whose presence makes the engine build its
  expert-group tables at stages 1 and 2 (stage 3 refuses native MoE modules and needs none);
- `count_gathered_bytes()`: what DeepSpeed all-gathers on this rank, by dtype (benchmarks).
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections import Counter

import torch.distributed as dist
from torch import nn

DEEPSPEED_VERSION = "0.19.8"  # the version these workarounds were measured on; tests/distributed/test_zero.py guards it


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's name for the expert groups of degree `ep_size` (its `utils/groups.py` convention)."""
    return f"ep_size_{ep_size}"


def select_accelerator() -> None:
    """Tell DeepSpeed it runs on the CPU where torch sees no GPU (unless the user chose with DS_ACCELERATOR), so
    that every rank does not log its probe's warning; call before anything imports deepspeed."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def import_deepspeed():
    """Import deepspeed with its start-up C++ build disabled; returns the module.

    On CPU, DeepSpeed's torch comm backend compiles a shared-memory all-reduce with the system compiler when it is
    first created (`deepspeed/comm/torch.py`, `build_shm_op`): 20–45 s per fresh machine, and a failure where no
    compiler exists. gloo does the same work without it; on GPUs the op is never built, so nothing changes there.
    """
    select_accelerator()
    import deepspeed

    comm_torch = importlib.import_module("deepspeed.comm.torch")  # `import deepspeed.comm.torch` clashes with torch
    comm_torch.build_shm_op = lambda: None
    _import_muon_without_compiling()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return deepspeed


def _import_muon_without_compiling() -> None:
    """DeepSpeed imports its Muon optimizer at every ZeRO start (the engine's optimizer check, the stage 1-2
    gradient reduction, stage 3's set-up) though moeforge never builds one. That module wraps three kernels in
    `torch.compile` as it is imported, and `torch.compile` imports dynamo and inductor: ~2 s of CPU on every rank.
    Import it once here with DeepSpeed's compile helper handing the functions back as they are (Muon would run
    eagerly, the same arithmetic; nothing here calls it)."""
    compiler = importlib.import_module("deepspeed.runtime.compiler")
    compile_helper = compiler.compile
    compiler.compile = lambda: (lambda fn: fn)  # read by `@compiler.compile()` in deepspeed/runtime/zero/muon
    try:
        importlib.import_module("deepspeed.runtime.zero.muon.muon_optimizer")
    finally:
        compiler.compile = compile_helper


def adopt_mesh_groups(mesh) -> None:
    """Register the mesh's groups as DeepSpeed's expert (EP) and expert-data (EDP) groups of `ep_size_{ep}`, and
    the default group as its world group. Every rank calls it (no collective: the groups already exist)."""
    from deepspeed.utils import groups

    name = expert_group_name(mesh.ep_size)
    groups._EXPERT_PARALLEL_GROUP[name] = mesh.ep_group
    groups._EXPERT_PARALLEL_GROUP_RANKS[name] = mesh.ep_group_ranks()
    groups._EXPERT_DATA_PARALLEL_GROUP[name] = mesh.edp_group
    groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = mesh.edp_group_ranks()
    if groups._WORLD_GROUP is None:
        groups._WORLD_GROUP = dist.GroupMember.WORLD


def tag_expert_params(params, mesh, stage: int) -> None:
    """Mark `params` (this rank's routed-expert shards) as DeepSpeed expert parameters of the mesh's groups."""
    name = expert_group_name(mesh.ep_size)
    for p in params:
        p.allreduce = False  # deepspeed.moe.utils.is_moe_param: reduce over the EDP group only
        p.group_name = name
        if stage == 3:  # read by ZeRO-3 when it partitions (partition_parameters.py, stage3.py)
            p.ds_zero_placement_family = "autoep_expert"
            p.ds_zero_partition_group_name = name
            p.ds_zero_partition_process_group = mesh.edp_group


def expert_marker(mesh) -> nn.Module:
    """A parameter-free module that DeepSpeed's engine counts as an MoE layer (`isinstance(m, MoE)`)."""
    from deepspeed.moe.layer import MoE

    class ExpertMarker(MoE):
        """Makes the engine set up its expert tables for `ep_size_{ep}`; owns no experts (`num_local_experts=0`,
        so checkpointing writes no per-expert files) and creates no groups (they are the mesh's)."""

        def __init__(self, ep_size: int):
            nn.Module.__init__(self)  # skip MoE.__init__: it would build DeepSpeed's own experts
            self.ep_size = ep_size
            self.num_experts = ep_size
            self.num_local_experts = 0
            self.expert_group_name = expert_group_name(ep_size)
            self.enable_expert_tensor_parallelism = False

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            pass  # the groups were adopted from the mesh

        def forward(self, *args, **kwargs):
            raise RuntimeError("ExpertMarker is a tag for DeepSpeed, never called")

    return ExpertMarker(mesh.ep_size)


@contextlib.contextmanager
def count_gathered_bytes():
    """Within the block, add up the bytes of every tensor DeepSpeed all-gathers on this rank (the gathered output,
    this rank's own piece included), keyed by dtype name; yields the Counter. Wraps the methods of DeepSpeed's comm
    backend object (`deepspeed.comm.comm.cdb`), which ZeRO's parameter gathers go through; empty where no
    DeepSpeed engine exists (stage 0)."""
    import deepspeed.comm.comm as ds_comm

    counts: Counter = Counter()
    backend = ds_comm.cdb
    if backend is None:
        yield counts
        return

    def add(tensors) -> None:
        for t in tensors:
            counts[str(t.dtype).removeprefix("torch.")] += t.numel() * t.element_size()

    def counting(name, outputs_of):
        original = getattr(backend, name)

        def wrapper(*args, **kwargs):
            add(outputs_of(*args, **kwargs))
            return original(*args, **kwargs)
        return wrapper

    wrappers = {
        "all_gather_into_tensor": counting("all_gather_into_tensor", lambda output_tensor, *a, **k: [output_tensor]),
        "all_gather": counting("all_gather", lambda tensor_list, *a, **k: tensor_list),
        "all_gather_coalesced": counting("all_gather_coalesced", lambda output_tensors, *a, **k: output_tensors),
    }
    for name, fn in wrappers.items():
        setattr(backend, name, fn)  # instance attributes shadow the class's methods
    try:
        yield counts
    finally:
        for name in wrappers:
            delattr(backend, name)
