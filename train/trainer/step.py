"""One optimizer step: accumulate gradients over this rank's micro-batches, reduce, clip, update, rebalance.

Order (each line's why):
1. lr from the step alone (stateless schedule, so a resumed run continues exactly);
2. forward + backward per micro-batch with the loss scaled by 1/accum, so the summed gradient is the
   gradient of the mean loss over the rank's slice; under `parallel.reduce_gradients` the ranks' slices
   combine into the gradient of the global batch's mean loss (equal micro-batch sizes everywhere);
3. `parallel.reduce_gradients` then `parallel.clip_grad_norm_` (the global norm over sharded experts);
4. optimizer step; then the expert-selection biases move from this step's loads summed over all ranks, so
   replicated biases stay identical on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List

import torch

import parallel
from train.model.moe import update_expert_biases
from train.trainer.metrics import StepMetrics
from train.trainer.precision import Precision
from train.trainer.schedule import LRSchedule
from train.trainer.state import TrainState


@dataclass
class StepContext:
    """What a step needs besides the state. `forward` is the (possibly compiled) model used for training."""

    forward: Callable
    precision: Precision
    schedule: LRSchedule
    mesh: object
    grad_clip: float
    tokens_per_step: int  # global: global_batch_size × seq_len


def bias_stats(model: torch.nn.Module) -> list:
    """(layer index, selection bias) of every MoE layer that balances with a bias."""
    return [(i, layer.router.expert_bias_E) for i, layer in model.moe_layers() if layer.moe.uses_expert_bias]


def train_step(state: TrainState, micro_batches: List[dict], ctx: StepContext) -> dict:
    """Run one optimizer step on this rank's micro-batches (collective); return the step's metrics record."""
    model, mesh, device = state.model, ctx.mesh, ctx.mesh.device
    lr = ctx.schedule.apply(state.optimizer, state.step)
    state.optimizer.zero_grad(set_to_none=True)
    metrics = StepMetrics(device)
    scale = 1.0 / len(micro_batches)
    for mb in micro_batches:
        input_ids = mb["input_ids"].to(device, non_blocking=True)
        labels = mb["labels"].to(device, non_blocking=True)
        with ctx.precision.autocast():
            out = ctx.forward(input_ids, labels)
        (out.loss * scale).backward()
        metrics.add(out)
    parallel.reduce_gradients(model, mesh)
    max_norm = ctx.grad_clip if ctx.grad_clip > 0 else float("inf")
    grad_norm = parallel.clip_grad_norm_(model, max_norm, mesh)
    state.optimizer.step()
    update_expert_biases(model, reduce=lambda t: parallel.all_reduce_stats(t, mesh))
    state.step += 1
    state.tokens += ctx.tokens_per_step
    record = {"step": state.step}
    record.update(metrics.finalize(mesh, bias_stats(model)))
    record.update(tokens=state.tokens, lr=lr, grad_norm=float(grad_norm))
    return record
