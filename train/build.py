"""`build_model(cfg, mesh, ...) -> BuiltModel`: the one model build pipeline, in one fixed order.

    1. meta build        `MoETransformer(cfg.model)` on the meta device: nothing allocated
    2. model converters  the precision recipe's module swaps (bf16 compute copies, FP8: `train.precision`), on the
                         meta model
       pipeline split    with parallel.pp_size > 1, this rank keeps its stage's layers (`parallel.pipeline`)
    3. expert parallel   this rank keeps its E/ep experts, the all-to-all dispatcher and count reducer
                         (`parallel.apply_expert_parallel`)
    4. checkpointing     `trainer.activation_checkpointing` wraps block methods (`parallel.activation_checkpointing`)
       -- stop_after="parallelize" ends here (the memory planner: shapes only, no process group needed)
    5. materialise       allocate this rank's tensors on `mesh.device`, initialise them from `init_seed`
    6. load weights      `weights(model)`, e.g. a resume, `init_from`, or a checkpoint to generate from
       -- stop_after="load" ends here (`train.generate`: a model, no optimizer)
    7. compile           `trainer.compile`: `torch.compile` of the model, the training forward (stage 0 only)
    8. engine            `parallel.build_engine`: stage 0 or DeepSpeed ZeRO, with the trainer's optimizer groups;
                         ZeRO copies the final weights into its partitions; with a pipeline, the schedule
                         (`parallel.pipeline.PipelineEngine`)

Why this order: converters swap module classes but keep every Parameter (the same names, so materialising
afterwards initialises them exactly as without FP8), and torchao's `Float8Linear.from_float` and our emulated and
grouped converters build on the meta device, so they run first and every later step sees the final modules.
Expert parallelism comes before materialisation so no rank allocates an expert it does not own; checkpointing
wraps methods that call whatever linears and dispatcher the blocks hold at run time, so it follows both.
Weights load into the materialised model before the engine, because ZeRO copies them at build time.

Callers: the trainer (every step), `train.generate` (to "load", on an inference copy of the run's config:
`for_inference`), the memory planner (to "parallelize" on a `planning_mesh`), and the HF exporter and checkpoint
readers (`meta_model`: step 1 alone, for names and shapes).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from parallel.activation_checkpointing import apply_activation_checkpointing
from parallel.engine import TrainEngine, build_engine
from parallel.mesh import Mesh
from parallel.parallelize import apply_expert_parallel, materialize
from train.config import ModelConfig, TrainConfig
from train.precision import build_precision

STOPS = ("parallelize", "load", "engine")


@dataclass
class EngineArgs:
    """What the engine step needs beyond the config: micro-batches per optimizer step, and the run directory
    that receives the generated DeepSpeed config."""

    accum_steps: int
    run_dir: Optional[Path] = None


@dataclass
class BuiltModel:
    """What the pipeline built: the model (this rank's share), the engine (None when stopped before it),
    the converters' reports (one line each, for the run log) and what the load step returned."""

    model: nn.Module
    engine: Optional[TrainEngine] = None
    reports: list[str] = field(default_factory=list)
    loaded: Any = None
    pipeline: Any = None  # `parallel.pipeline.PipelineSplit` with parallel.pp_size > 1: this rank's chunks
    hidden_dtype: torch.dtype = torch.float32  # what flows between pipeline stages


def meta_model(model_cfg: ModelConfig) -> nn.Module:
    """Step 1: the model `model_cfg` describes, on the meta device (no memory, any size)."""
    from train.model import MoETransformer

    with torch.device("meta"):
        return MoETransformer(model_cfg)


def convert(model: nn.Module, cfg: TrainConfig, device: torch.device) -> list[str]:
    """Step 2: the precision recipe's model converters, in place; their one-line reports."""
    return [c.convert(model) for c in build_precision(cfg.precision, device).model_converters()]


def load(model: nn.Module, weights: Optional[Callable[[nn.Module], Any]]) -> Any:
    """Step 6: `weights(model)` fills the materialised model (collective where the loader is); None keeps the
    initialised weights."""
    return None if weights is None else weights(model)


def compile_step(model: nn.Module, cfg: TrainConfig) -> Optional[Callable]:
    """Step 7: the compiled model that training forwards call (`trainer.compile`), or None to call the model."""
    return torch.compile(model) if cfg.trainer.compile else None


def hidden_dtype(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """The residual stream's dtype under the precision recipe (what pipeline stages pass on): the embedding's
    output dtype, found on the meta model after the converters."""
    with build_precision(cfg.precision, device).autocast():
        return model.embed(torch.zeros(1, 1, dtype=torch.long, device="meta")).dtype


def engine_step(model: nn.Module, cfg: TrainConfig, mesh: Mesh, args: EngineArgs,
                forward: Optional[Callable] = None, built: Optional[BuiltModel] = None) -> TrainEngine:
    """Step 8: the engine (`parallel.zero_stage`) over the trainer's optimizer groups, training through
    `forward` (step 7's compiled model) where given; a pipeline's (`built.pipeline`) runs its schedule."""
    from train.trainer.optim import optimizer_factory, param_groups

    if built is not None and built.pipeline is not None:
        from parallel.pipeline import build_pipeline_engine

        return build_pipeline_engine(model, param_groups(model, cfg.optim.weight_decay),
                                     optimizer_factory(cfg.optim), cfg, mesh, built.pipeline, args.accum_steps,
                                     built.hidden_dtype)
    return build_engine(model, param_groups(model, cfg.optim.weight_decay), optimizer_factory(cfg.optim), cfg, mesh,
                        args.accum_steps, run_dir=args.run_dir, forward=forward)


def build_model(cfg: TrainConfig, mesh: Mesh, *, init_seed: Optional[int] = None, stop_after: str = "engine",
                weights: Optional[Callable[[nn.Module], Any]] = None, engine_args: Optional[EngineArgs] = None,
                model: Optional[nn.Module] = None) -> BuiltModel:
    """Run the pipeline (module docstring) for this rank, up to and including `stop_after` ("parallelize",
    "load" or "engine"). `init_seed` seeds materialisation (`train.model.draw_init_seed()`; the same on every
    rank); `weights` is the load step; `engine_args` is required for "engine". `model`: a meta model already
    built from `cfg.model` (step 1 done; the planner reuses one across layouts). Unsupported combinations
    (an impossible layout, a checkpointing mode, an fp8 recipe outside fp8) raise a ValueError naming the field.
    Collective from step 6 on where the loader and the engine are."""
    if stop_after not in STOPS:
        raise ValueError(f"build_model: stop_after={stop_after!r}, expected one of {', '.join(STOPS)}")
    if stop_after == "engine" and engine_args is None:
        raise ValueError("build_model: building the engine needs engine_args (accumulation steps, run dir)")
    if model is None:
        model = meta_model(cfg.model)
    built = BuiltModel(model, reports=convert(model, cfg, mesh.device))
    if cfg.parallel.pp_size > 1:
        from parallel.pipeline import split_pipeline
        from train.config.pipeline import stage_layout

        built.hidden_dtype = hidden_dtype(model, cfg, mesh.device)
        built.pipeline = split_pipeline(model, stage_layout(cfg), cfg.parallel.pp_size, mesh.pp_rank)
    apply_expert_parallel(model, cfg, mesh)
    apply_activation_checkpointing(model, cfg.trainer.activation_checkpointing)
    if stop_after == "parallelize":
        return built
    materialize(model, mesh.device, init_seed)
    built.loaded = load(model, weights)
    if stop_after == "load":
        return built
    model.train()
    built.engine = engine_step(model, cfg, mesh, engine_args, forward=compile_step(model, cfg), built=built)
    return built


def for_inference(cfg: TrainConfig, device: str | torch.device = "cpu") -> tuple[TrainConfig, Mesh]:
    """A copy of a run's config for one process running the trained model as is: one rank (ep_size 1, stage 0, no
    pipeline),
    fp32 without converters, no activation checkpointing, no compile; and its one-rank mesh on `device`."""
    par = dataclasses.replace(cfg.parallel, ep_size=1, zero_stage=0, pp_size=1, pp_schedule="1f1b",
                              pp_virtual_stages=1, pp_layout=None)
    trainer = dataclasses.replace(cfg.trainer, activation_checkpointing="none", compile=False)
    precision = dataclasses.replace(cfg.precision, name="fp32", recipe=None)
    return (dataclasses.replace(cfg, parallel=par, trainer=trainer, precision=precision),
            Mesh(device=torch.device(device)))


def planning_mesh(world_size: int, ep_size: int) -> Mesh:
    """Rank 0 of a `world_size`-rank layout, without process groups: enough for the pipeline's steps 1-4 on the
    meta device (the planner), never for a forward pass."""
    return Mesh(rank=0, world_size=world_size, ep_size=ep_size, ep_rank=0, device=torch.device("meta"))
