"""The parallel API the trainer calls, gathered from the modules that implement it.

Order of use in a training script:
    mesh = init_distributed(cfg)                  # process groups, device        (parallel/mesh.py)
    with torch.device("meta"): model = MoETransformer(cfg.model)            # nothing allocated yet
    parallelize(model, cfg, mesh, init_seed)      # shard experts, AC, allocate + init own tensors (parallelize.py)
    engine = build_engine(model, groups, optimizer_cls, cfg, mesh, accum)        (parallel/engine.py)
    engine.backward(loss) per micro-batch; engine.step()    (stage 0: parallel/grads.py; 1-3: parallel/zero/)
    sharded_checkpoint.collect_owned/save, load_model_weights/read_optimizer_state: checkpoints in logical
      coordinates, each rank its share, any layout reads any other's            (parallel/sharded_checkpoint.py)
    gather_full_state_dict (to rank 0: tests, small models) / load_full_state_dict (imported safetensors weights)
"""
from __future__ import annotations

from parallel.engine import StepOutcome, TrainEngine, build_engine
from parallel.grads import clip_grad_norm_, reduce_gradients
from parallel.mesh import Mesh, barrier, broadcast_object, gather_objects, init_distributed, shutdown
from parallel.parallelize import parallelize
from parallel.reduce import all_reduce_stats
from parallel.state_dict import gather_full_state_dict, load_full_state_dict

__all__ = [
    "Mesh", "init_distributed", "parallelize", "build_engine", "TrainEngine", "StepOutcome", "reduce_gradients", "clip_grad_norm_", "all_reduce_stats",
    "gather_full_state_dict", "load_full_state_dict", "barrier", "broadcast_object", "gather_objects", "shutdown",
]
