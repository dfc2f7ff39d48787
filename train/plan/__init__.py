"""Memory planner: one rank's bytes of parameters, gradients, optimizer state, activations and all-to-all
buffers for a training layout, by arithmetic on the meta device (no GPU). `python -m train.plan` is its CLI."""
from train.plan.activations import MODES, Shapes, activation_bytes
from train.plan.planner import plan_memory, rank_params

__all__ = ["MODES", "Shapes", "activation_bytes", "plan_memory", "rank_params"]
