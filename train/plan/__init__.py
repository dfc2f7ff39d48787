"""Planner: one rank's bytes of parameters, gradients, optimizer state, activations and all-to-all buffers for a
training layout, by arithmetic on the meta device (no GPU), per pipeline stage when there is a pipeline
(`train.plan.pipeline`), and the step time that layout would take from its FLOPs and bytes (`train.plan.time`).
`python -m train.plan` is its CLI."""
from train.plan.activations import MODES, Shapes, activation_bytes
from train.plan.planner import plan_memory, rank_params
from train.plan.time import Hardware, estimate_step_time

__all__ = ["MODES", "Hardware", "Shapes", "activation_bytes", "estimate_step_time", "plan_memory", "rank_params"]
