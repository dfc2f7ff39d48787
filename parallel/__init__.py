"""Expert parallelism applied to models built by `train/` (which never imports torch.distributed).

The API, in its order of use (each name is re-exported here from the module that owns it):
    mesh = init_distributed(cfg)                  # process groups, device; 1-rank Mesh off torchrun (mesh.py)
    train.build.build_model(cfg, mesh, ...)       # the build pipeline, which calls this room's steps in order:
        apply_expert_parallel, apply_activation_checkpointing, materialize (parallelize.py, activation_checkpointing.py)
        build_engine(model, groups, optimizer_cls, cfg, mesh, accum)   # backward, gradient reduction,
        # clipping, step and optimizer state: moeforge's own at zero_stage=0, DeepSpeed ZeRO 1-3 (engine.py, zero/)
    engine.backward(loss) per micro-batch; engine.step()
- `parallelize(model, cfg, mesh, init_seed)`: expert parallelism, checkpointing and materialisation of a model a
  test has built (the pipeline's steps 3-5 without the rest).
- `reduce_gradients(model, mesh)`, `clip_grad_norm_(model, max_norm, mesh) -> total_norm`: stage 0's gradient
  average and global-norm clipping over sharded experts (grads.py).
- `all_reduce_stats(tensor, mesh, op='sum'|'max')`: a statistics tensor reduced over every rank (reduce.py).
- `gather_full_state_dict(model, mesh)` (to rank 0: tests, small models) / `load_full_state_dict(model, sd, mesh)`
  (imported safetensors weights): logical (unsharded) weights (state_dict.py).
- `barrier(mesh)`, `broadcast_object(obj, mesh)`, `gather_objects(obj, mesh)`, `shutdown(mesh)`: housekeeping.

Modules: `mesh` (groups), `permute` (pure index bookkeeping), `comm` (differentiable all-to-all),
`dispatcher` (`AllToAllDispatcher`), `parallelize`, `activation_checkpointing`, `grads`, `reduce`, `state_dict`,
`engine`, `memory` (bytes an engine holds), `ports`, `zero` (DeepSpeed).
"""
from parallel.engine import StepOutcome, TrainEngine, build_engine
from parallel.grads import clip_grad_norm_, reduce_gradients
from parallel.mesh import Mesh, barrier, broadcast_object, gather_objects, init_distributed, shutdown
from parallel.parallelize import parallelize
from parallel.reduce import all_reduce_stats
from parallel.state_dict import gather_full_state_dict, load_full_state_dict

__all__ = [
    "Mesh", "init_distributed", "parallelize", "build_engine", "TrainEngine", "StepOutcome", "reduce_gradients",
    "clip_grad_norm_", "all_reduce_stats", "gather_full_state_dict", "load_full_state_dict", "barrier",
    "broadcast_object", "gather_objects", "shutdown",
]
