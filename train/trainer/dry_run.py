"""`python -m train ... trainer.dry_run=true`: every check a real start makes, then exit, touching no data and no
device: the command to run before submitting to a thousand GPUs.

`dry_run(cfg, world_size)` runs, in the order a start does: the config (`validate_config`, every group's own
`validate()` and the cross-group rules for this world size); the data sources (files exist, token-file headers
and manifests validate, nothing read or tokenized); the run record (routing groups, with the stored value of a
checkpoint the run would resume; batch arithmetic); the model, built on the meta device; the memory plan of this
layout (`train.plan.planner.plan_memory`). No process group, no tensor memory, nothing written to the run dir.
Every refusal is a `ConfigError` whose one-line message names the field.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from train.config import ModelConfig, TrainConfig
from train.config.errors import ConfigError
from train.trainer.run_record import RunRecord
from train.trainer.validate import validate_config, world_size_from_env


def _resumed_model(cfg: TrainConfig) -> tuple[Optional[ModelConfig], Optional[Path]]:
    """The model config of the checkpoint a start would resume (its stored routing groups win), if any."""
    from train.checkpoint import CheckpointError, load_config, newest_complete, resolve_checkpoint

    t = cfg.trainer
    try:
        if t.resume == "never":
            return None, None
        if t.resume == "auto":
            path = newest_complete(Path(t.run_dir)) if t.run_dir else None
        else:
            path = resolve_checkpoint(t.resume)
        return (load_config(path).model, path) if path is not None else (None, None)
    except (CheckpointError, OSError) as e:
        raise ConfigError(f"trainer.resume={t.resume!r}: {e}") from None


def dry_run(cfg: TrainConfig, world_size: Optional[int] = None) -> dict:
    """Every check a start of `cfg` on `world_size` ranks (default: torchrun's WORLD_SIZE) makes; the summary
    (one JSON-able dict). Raises `ConfigError` (one line naming the field) for the first refusal."""
    from train.data.sources import check_sources
    from train.plan.planner import plan_memory

    world = world_size_from_env() if world_size is None else world_size
    validate_config(cfg, world)
    try:
        sources = check_sources(cfg.data)
    except ValueError as e:  # TokenFileError, DataError: the message names the file and the fix
        raise ConfigError(f"data.paths: {e}" if not str(e).startswith("data.") else str(e)) from None
    stored, resumes = _resumed_model(cfg)
    record = RunRecord.resolve(cfg, world, stored, f"the checkpoint {resumes} a start would resume")
    from train.build import meta_model  # the build pipeline's step 1, as the trainer's start runs it

    model = meta_model(record.model_config(cfg.model))
    total = sum(p.numel() for p in model.parameters())
    plan = plan_memory(record.stamped(cfg), world)
    return {
        "dry_run": "ok", "model": cfg.model.name, "total_params": total, "world_size": world,
        "ep_size": record.ep_size, "edp_size": record.edp_size, "grad_accum_steps": record.grad_accum_steps,
        "routing_groups": record.routing_groups, "resumes": str(resumes) if resumes else None,
        "data": sources, "peak_bytes": plan["peak_bytes"], "params_bytes": plan["params_bytes"],
        "activations_bytes": plan["activations_bytes"],
    }


def summary_lines(result: dict) -> list[str]:
    """A short readable summary of `dry_run`'s result (the JSON line follows it)."""
    data = ", ".join(f"{s['source']}" + (f" ({s['files']} files)" if s["files"] else "") for s in result["data"])
    return [
        f"dry run ok: {result['model']}, {result['total_params']:,} parameters (built on the meta device)",
        f"  layout: {result['world_size']} rank(s), ep_size {result['ep_size']}, {result['grad_accum_steps']} "
        f"micro-batch(es) per step, routing groups {result['routing_groups']}"
        + (f" (from {result['resumes']})" if result["resumes"] else ""),
        f"  data: {data}",
        f"  memory plan: peak {result['peak_bytes'] / 2**30:.2f} GiB per rank",
    ]
