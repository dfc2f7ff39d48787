"""Expert parallelism applied to models built by `train/` (which never imports torch.distributed).

Public API (the trainer calls only these):
- `init_distributed(cfg) -> Mesh`: start the process group (nccl on GPUs, gloo on CPU) if launched by torchrun,
  build the expert-parallel / expert-data-parallel groups; a 1-rank `Mesh` otherwise. Layout: `parallel/mesh.py`.
- `parallelize(model, cfg, mesh)`: make a built model expert-parallel in place.
- `build_engine(model, param_groups, optimizer_cls, cfg, mesh, accum_steps) -> TrainEngine`: the seam that owns
  backward, gradient reduction, clipping, the optimizer step and the optimizer's state: moeforge's own data
  parallelism at `parallel.zero_stage=0`, DeepSpeed ZeRO (`parallel/zero/`) at 1–3.
- `reduce_gradients(model, mesh)`: average gradients as the single-process reference would have them.
- `clip_grad_norm_(model, max_norm, mesh) -> total_norm`: global-norm clipping over sharded experts.
- `all_reduce_stats(tensor, mesh, op='sum'|'max')`: a statistics tensor reduced over every rank.
- `gather_full_state_dict(model, mesh)` / `load_full_state_dict(model, sd, mesh)`: logical (unsharded) weights.
- `barrier(mesh)`, `broadcast_object(obj, mesh)`, `gather_objects(obj, mesh)`, `shutdown(mesh)`: housekeeping.
- `parallel.sharded_checkpoint`: weights and optimizer state saved per rank in logical coordinates (DCP),
  read back into any layout.

Modules: `mesh` (groups), `permute` (pure index bookkeeping), `comm` (differentiable all-to-all),
`dispatcher` (`AllToAllDispatcher`), `parallelize`, `grads`, `state_dict`, `engine`, `sharded_checkpoint`,
`zero` (DeepSpeed).
"""
from parallel.api import (
    Mesh,
    StepOutcome,
    TrainEngine,
    all_reduce_stats,
    build_engine,
    barrier,
    broadcast_object,
    gather_objects,
    clip_grad_norm_,
    gather_full_state_dict,
    init_distributed,
    load_full_state_dict,
    parallelize,
    reduce_gradients,
    shutdown,
)

__all__ = [
    "Mesh", "init_distributed", "parallelize", "build_engine", "TrainEngine", "StepOutcome", "reduce_gradients", "clip_grad_norm_", "all_reduce_stats",
    "gather_full_state_dict", "load_full_state_dict", "barrier", "broadcast_object", "gather_objects", "shutdown",
]
