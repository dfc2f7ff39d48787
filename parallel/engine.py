"""The training engine: the one seam that owns backward, gradient reduction, clipping, the optimizer step and the
optimizer's state, whatever implements data parallelism underneath.

    engine = build_engine(model, param_groups, cfg, mesh, accum_steps)   # the build pipeline's last step
    for each micro-batch:  engine.backward(engine.forward(input_ids, labels).loss)
    grad_norm = engine.step()                                            # reduce, clip, update, zero gradients
    engine.export_state() / engine.import_state(...)                     # logical optimizer state (checkpoints)

`parallel.zero_stage=0` is `LocalEngine`: moeforge's own data parallelism (`parallel/grads.py`), gradient
reduction and global-norm clipping over sharded experts. Stages 1–3 are `parallel.zero.DeepSpeedEngine`, which
hands the same model and optimizer to DeepSpeed ZeRO. The trainer's step reads the same for both.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from parallel.grads import BUCKET_BYTES, clip_grad_norm_, reduce_gradients
from parallel.memory import tensors_in, unique_bytes
from parallel.mesh import Mesh


@dataclass
class StepOutcome:
    """What `TrainEngine.step()` did. `skipped`: the global gradient norm was not finite, so no parameter and no
    optimizer state changed (every rank decides alike: the norm is the same on every rank). `nonfinite_params`:
    names of parameters with non-finite gradients on this rank, where the engine can tell (first few)."""

    grad_norm: float
    skipped: bool = False
    nonfinite_params: list = field(default_factory=list)


class TrainEngine:
    """What every engine provides. `model` is the parallelized module (stable state-dict keys); `optimizer` is the
    torch optimizer whose `param_groups` carry the learning rate the schedule sets."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    forward: Callable  # what a training forward pass calls (the model, compiled or wrapped)
    runner = None  # a pipeline stage's schedule (`parallel.pipeline.PipelineRunner`), which runs the micro-batches

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradient of one micro-batch's mean loss, scaled by 1/accum_steps."""
        raise NotImplementedError

    def step(self) -> StepOutcome:
        """Collective. Before: each rank holds the accumulated gradients of its own micro-batches. After: the
        parameters hold the update from the gradient of the global batch's mean loss (clipped to
        `optim.grad_clip` by its global norm), gradients are cleared. Returns that norm, before clipping; a
        non-finite norm skips the update on every rank (`StepOutcome.skipped`)."""
        raise NotImplementedError

    def full_parameters(self):
        """Context in which every parameter of `model` holds its whole local tensor (ZeRO-3 gathers them); the
        expert tensors are still this rank's EP shard. Collective on entry and exit."""
        return contextlib.nullcontext()

    def export_state(self) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        """Collective (every rank iterates to the end): for every parameter of `model`, in `named_parameters()`
        order, (name, {"param": weights, kind: optimizer state ...}), each tensor this rank's whole local
        tensor (its experts, unpartitioned), fp32. What `train.checkpoint.sharded` saves."""
        raise NotImplementedError

    def import_state(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        """Collective: set the optimizer state of the named parameters from whole local tensors (the shapes
        `export_state` gives, any layout's checkpoint read in this one's). Called in batches that cover every
        parameter once, in `named_parameters()` order."""
        raise NotImplementedError

    def held_bytes(self) -> dict:
        """Bytes this rank holds now: `params` (the model's weights), `grads` (gradients, whole or partitioned)
        and `optimizer` (optimizer moments plus any separate fp32 master copy), each tensor counted once."""
        raise NotImplementedError


class LocalEngine(TrainEngine):
    """Stage 0: plain backward, `reduce_gradients` and `clip_grad_norm_` over the mesh, then the optimizer."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, mesh: Mesh, accum_steps: int,
                 grad_clip: float, forward: Callable | None = None, bucket_mb: float = BUCKET_BYTES / 2**20):
        self.model, self.optimizer, self.mesh = model, optimizer, mesh
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.forward = model if forward is None else forward  # the compiled model, when the pipeline compiled it
        self.loss_scale = 1.0 / accum_steps
        self.max_norm = grad_clip if grad_clip > 0 else float("inf")

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.loss_scale).backward()

    def step(self) -> StepOutcome:
        reduce_gradients(self.model, self.mesh, self.bucket_bytes)
        return self._update(float(clip_grad_norm_(self.model, self.max_norm, self.mesh)))

    def _update(self, grad_norm: float) -> StepOutcome:
        """After reduction and clipping: the optimizer step if the norm is finite (else the culprits' names), then
        every gradient cleared."""
        outcome = StepOutcome(grad_norm)
        if math.isfinite(grad_norm):
            self.optimizer.step()
        else:  # rare: find the culprits before the gradients go
            outcome.skipped = True
            outcome.nonfinite_params = [name for name, p in self.model.named_parameters()
                                        if p.grad is not None and not torch.isfinite(p.grad).all()][:8]
        self.optimizer.zero_grad(set_to_none=True)
        return outcome

    def export_state(self):
        for name, p in self.model.named_parameters():
            yield name, {"param": p.detach(), **self.optimizer.state.get(p, {})}

    def import_state(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        params = dict(self.model.named_parameters())
        for name, kinds in states.items():
            p = params[name]
            # scalars (AdamW's step) stay on the CPU as torch's optimizers keep them; the rest on the device
            self.optimizer.state[p] = {k: (v.to(p.device) if v.dim() else v.clone()) for k, v in kinds.items()}

    def held_bytes(self) -> dict:
        params = list(self.model.parameters())  # fp32 and updated in place: they are the master weights
        return {"params": unique_bytes(params),
                "grads": unique_bytes(p.grad for p in params if p.grad is not None),
                "optimizer": unique_bytes(tensors_in(list(self.optimizer.state.values())))}


def build_engine(model: nn.Module, param_groups: list[dict], optimizer_cls, cfg, mesh: Mesh,
                 accum_steps: int, run_dir=None, forward: Callable | None = None) -> TrainEngine:
    """The engine `parallel.zero_stage` asks for, over an already parallelized model whose weights are final
    (ZeRO copies them into its partitions here). `param_groups` and `optimizer_cls(groups)` define the
    optimizer; DeepSpeed stages split the groups into dense and expert groups first. `run_dir` receives the
    generated DeepSpeed config. `forward`: what a training forward calls instead of `model` (the pipeline's
    compiled model; stage 0 only, as DeepSpeed wraps the module itself)."""
    if cfg.parallel.zero_stage == 0:
        return LocalEngine(model, optimizer_cls(param_groups), mesh, accum_steps, cfg.optim.grad_clip,
                           forward=forward, bucket_mb=cfg.parallel.bucket_mb)
    if forward is not None:
        raise ValueError(f"trainer.compile=true is not supported with parallel.zero_stage={cfg.parallel.zero_stage}: "
                         "use trainer.compile=false, or parallel.zero_stage=0")
    from parallel.zero.engine import DeepSpeedEngine

    return DeepSpeedEngine(model, param_groups, optimizer_cls, cfg, mesh, accum_steps, run_dir)
