"""Expert parallelism applied to models built by `train/`.

Public API (the trainer calls only these):
- `init_distributed(cfg) -> Mesh`: start the process group (nccl on GPUs, gloo on CPU) if launched by torchrun,
  build the expert-parallel / expert-data-parallel groups; a 1-rank `Mesh` otherwise.
- `parallelize(model, cfg, mesh)`: make a built model expert-parallel in place.
- `reduce_gradients(model, mesh)`: average gradients as the single-process reference would have them.
- `clip_grad_norm_(model, max_norm, mesh) -> total_norm`: global-norm clipping over sharded experts.
- `all_reduce_stats(tensor, mesh)`: sum of a statistics tensor over every rank.

The stubs below are the single-process behaviour; `parallel/` modules replace them with the real thing.
"""
from parallel.api import Mesh, all_reduce_stats, clip_grad_norm_, init_distributed, parallelize, reduce_gradients

__all__ = ["Mesh", "init_distributed", "parallelize", "reduce_gradients", "clip_grad_norm_", "all_reduce_stats"]
