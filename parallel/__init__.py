"""Expert parallelism applied to models built by `train/` (which never imports torch.distributed).

Public API (the trainer calls only these):
- `init_distributed(cfg) -> Mesh`: start the process group (nccl on GPUs, gloo on CPU) if launched by torchrun,
  build the expert-parallel / expert-data-parallel groups; a 1-rank `Mesh` otherwise. Layout: `parallel/mesh.py`.
- `parallelize(model, cfg, mesh)`: make a built model expert-parallel in place.
- `reduce_gradients(model, mesh)`: average gradients as the single-process reference would have them.
- `clip_grad_norm_(model, max_norm, mesh) -> total_norm`: global-norm clipping over sharded experts.
- `all_reduce_stats(tensor, mesh)`: sum of a statistics tensor over every rank.
- `gather_full_state_dict(model, mesh)` / `load_full_state_dict(model, sd, mesh)`: logical (unsharded) weights.
- `barrier(mesh)`, `broadcast_object(obj, mesh)`, `shutdown(mesh)`: process-group housekeeping.

Modules: `mesh` (groups), `permute` (pure index bookkeeping), `comm` (differentiable all-to-all),
`dispatcher` (`AllToAllDispatcher`), `parallelize`, `grads`, `state_dict`.
"""
from parallel.api import (
    Mesh,
    all_reduce_stats,
    barrier,
    broadcast_object,
    clip_grad_norm_,
    gather_full_state_dict,
    init_distributed,
    load_full_state_dict,
    parallelize,
    reduce_gradients,
    shutdown,
)

__all__ = [
    "Mesh", "init_distributed", "parallelize", "reduce_gradients", "clip_grad_norm_", "all_reduce_stats",
    "gather_full_state_dict", "load_full_state_dict", "barrier", "broadcast_object", "shutdown",
]
