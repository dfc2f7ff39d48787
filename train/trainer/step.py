"""One optimizer step: accumulate gradients over this rank's micro-batches, reduce, clip, update, rebalance.

Order (each line's why):
1. lr from the step alone (stateless schedule, so a resumed run continues exactly);
2. forward + `engine.backward` per micro-batch; the engine scales each loss by 1/accum, so the summed gradient
   is the gradient of the mean loss over the rank's slice (equal micro-batch sizes everywhere);
3. `engine.step()`: the ranks' gradients combine into the gradient of the global batch's mean loss, are
   clipped by their global norm (over sharded experts and ZeRO partitions alike) and applied. The engine is
   moeforge's own data parallelism at `parallel.zero_stage=0` and DeepSpeed ZeRO at 1–3 (`parallel/engine.py`).
   A non-finite global gradient norm (a NaN or inf loss on any rank makes it so) skips the update on every rank:
   the record says `skipped` and names the parameters with non-finite gradients where the engine can tell;
4. then the expert-selection biases move from this step's loads summed over all ranks, so replicated biases
   stay identical on every rank (loads are counts, finite even on a skipped step).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch

import parallel
from train.model.moe import update_expert_biases
from train.trainer.metrics import StepMetrics
from train.precision import Precision
from train.trainer.schedule import LRSchedule
from train.trainer.state import TrainState


@dataclass
class StepContext:
    """What a step needs besides the state."""

    precision: Precision
    schedule: LRSchedule
    mesh: object
    tokens_per_step: int  # global: global_batch_size × seq_len
    nan_steps: frozenset = frozenset()  # steps whose loss is poisoned on purpose (train/trainer/faults.py)


def bias_stats(model: torch.nn.Module) -> list:
    """(layer index, selection bias) of every MoE layer that balances with a bias."""
    return [(i, layer.router.expert_bias_E) for i, layer in model.moe_layers() if layer.moe.uses_expert_bias]


def train_step(state: TrainState, micro_batches: List[dict], ctx: StepContext) -> dict:
    """Run one optimizer step on this rank's micro-batches (collective); return the step's metrics record."""
    model, engine, mesh, device = state.model, state.engine, ctx.mesh, ctx.mesh.device
    lr = ctx.schedule.apply(engine.optimizer, state.step)
    metrics = StepMetrics(device)
    runner = engine.runner
    if runner is not None:  # a pipeline stage: the schedule runs every micro-batch's forward and backward
        for out in runner.train(micro_batches, ctx.precision.autocast, poison=state.step + 1 in ctx.nan_steps):
            metrics.add(out)
        micro_batches = []
    for mb in micro_batches:
        input_ids = mb["input_ids"].to(device, non_blocking=True)
        labels = mb["labels"].to(device, non_blocking=True)
        # Present only with data.document_mask: the loader then adds each token's document index in its row.
        # Passed only then, so the call without it stays the plain (input_ids, labels) one.
        extra = {}
        if mb.get("document_ids") is not None:
            extra["document_ids"] = mb["document_ids"].to(device, non_blocking=True)
        with ctx.precision.autocast():
            out = engine.forward(input_ids, labels, **extra)
        if state.step + 1 in ctx.nan_steps:
            out.loss = out.loss * float("nan")
        engine.backward(out.loss)
        metrics.add(out)
    outcome = engine.step()
    # loads of the layers this rank runs, summed over the ranks that run them (its pipeline stage)
    update_expert_biases(model, reduce=lambda t: parallel.all_reduce_stats(t, mesh, over="stage"))
    state.step += 1
    state.tokens += ctx.tokens_per_step
    record = {"step": state.step}
    record.update(metrics.finalize(mesh, bias_stats(model)))
    record.update(tokens=state.tokens, lr=lr, grad_norm=outcome.grad_norm)
    if outcome.skipped:
        record.update(skipped=True, nonfinite_params=outcome.nonfinite_params)
    return record
