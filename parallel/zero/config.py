"""The DeepSpeed config, generated from the Hydra config (the one source of truth).

`deepspeed_config(cfg, world_size)` maps every value moeforge already owns onto DeepSpeed's keys; the keys a user
adds under `parallel.deepspeed` are merged on top, and one that contradicts a generated value is an error naming
both (`DeepSpeedConfigError`). Precision: DeepSpeed always runs in fp32 here; moeforge's own `precision=bf16_autocast`
(autocast around an fp32 model, fp32 router and losses) and `precision=bf16` (bf16 copies of the fp32 weights, whose
gradients reach the fp32 Parameters) happen inside the forward pass, so DeepSpeed's `bf16`
and `fp16` modes, which cast the stored weights themselves, are refused. No deepspeed import here, so validation
can run before any process group, data or model exists.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

CONFIG_FILE = "deepspeed_config.json"

# Keys a user may not set at all: moeforge brings its own optimizer, schedule and precision recipe.
_OWNED_ELSEWHERE = {
    "optimizer": "optim.* (moeforge builds the optimizer and hands it to DeepSpeed)",
    "scheduler": "optim.schedule / optim.warmup_steps (moeforge's schedule sets the learning rate)",
    "fp16": "precision=bf16_autocast (moeforge's mixed precision; DeepSpeed's fp16 would cast the weights)",
    "amp": "precision=bf16_autocast",
}

# Generated key path -> the Hydra field it comes from (for error messages).
_SOURCE = {
    "train_batch_size": "trainer.global_batch_size",
    "train_micro_batch_size_per_gpu": "trainer.micro_batch_size",
    "gradient_accumulation_steps": "trainer.global_batch_size / (trainer.micro_batch_size x world size)",
    "gradient_clipping": "optim.grad_clip",
    "zero_optimization.stage": "parallel.zero_stage",
    "zero_optimization.reduce_bucket_size": "parallel.bucket_mb",
    "zero_optimization.allgather_bucket_size": "parallel.bucket_mb",
    "zero_optimization.stage3_prefetch_bucket_size": "parallel.bucket_mb",
    "bf16.enabled": "precision=bf16_autocast (moeforge autocasts inside the forward; DeepSpeed keeps fp32 weights)",
    "zero_optimization.elastic_checkpoint": "moeforge's checkpoint layout (per-rank optimizer partitions)",
    "zero_allow_untested_optimizer": "optim.name (moeforge's torch optimizer)",
}


class DeepSpeedConfigError(ValueError):
    """A `parallel.deepspeed` key that cannot work or that contradicts the Hydra config."""


def bucket_numel(bucket_mb: float) -> int:
    """Elements of fp32 gradient in a bucket of `bucket_mb` MiB (DeepSpeed counts buckets in elements)."""
    return int(bucket_mb * 2**20) // 4


def generated_config(cfg, accum_steps: int) -> dict:
    """The DeepSpeed keys moeforge derives from `cfg` (before user extras); `accum_steps` is the accumulation the
    data module derives from the batch sizes and the world size (`train.data.check_batch_sizes`)."""
    t, stage = cfg.trainer, cfg.parallel.zero_stage
    bucket = bucket_numel(cfg.parallel.bucket_mb)
    zero: dict[str, Any] = {"stage": stage, "reduce_bucket_size": bucket, "elastic_checkpoint": False}
    if stage == 3:
        zero["stage3_prefetch_bucket_size"] = bucket
    else:
        zero["allgather_bucket_size"] = bucket
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum_steps,
        "gradient_clipping": float(cfg.optim.grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # moeforge logs the step; DeepSpeed's own step lines would duplicate it
        "wall_clock_breakdown": False,
    }


def _merge(generated: dict, extra: dict, path: str = "") -> dict:
    out = copy.deepcopy(generated)
    for key, value in extra.items():
        where = f"{path}{key}"
        if path == "" and key in _OWNED_ELSEWHERE:
            raise DeepSpeedConfigError(
                f"parallel.deepspeed.{key} cannot be set: moeforge owns it through {_OWNED_ELSEWHERE[key]}")
        if key not in out:
            out[key] = copy.deepcopy(value)
        elif isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = _merge(out[key], value, f"{where}.")
        elif out[key] != value:
            raise DeepSpeedConfigError(
                f"parallel.deepspeed.{where}={value!r} contradicts {_SOURCE.get(where, 'the generated value')}"
                f" (which gives {out[key]!r}): set it there, not under parallel.deepspeed")
    return out


def deepspeed_config(cfg, accum_steps: int) -> dict:
    """The full DeepSpeed config: generated keys plus `parallel.deepspeed` extras (contradictions raise)."""
    extra = cfg.parallel.deepspeed or {}
    if not isinstance(extra, dict):
        raise DeepSpeedConfigError(f"parallel.deepspeed must be a mapping of DeepSpeed keys, got {extra!r}")
    return _merge(generated_config(cfg, accum_steps), dict(extra))


def check_deepspeed_config(cfg, accum_steps: int) -> dict:
    """Validate what DeepSpeed would be given, before any work: contradictions, and DeepSpeed's own schema for
    the `zero_optimization` section (unknown or ill-typed keys). Returns the config. Raises
    `DeepSpeedConfigError` (also when deepspeed is not installed)."""
    ds = deepspeed_config(cfg, accum_steps)
    from parallel.zero.runtime import select_accelerator

    select_accelerator()
    try:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    except ImportError as e:
        raise DeepSpeedConfigError(
            f"parallel.zero_stage={cfg.parallel.zero_stage} needs deepspeed ({e}): run the README's set-up "
            f"(bash scripts/setup_env.sh) or pip install -c requirements/constraints.txt deepspeed") from None
    try:
        DeepSpeedZeroConfig(**ds["zero_optimization"])
    except Exception as e:  # pydantic's ValidationError lists each bad key
        first = str(e).strip().splitlines()
        raise DeepSpeedConfigError(
            f"parallel.deepspeed.zero_optimization is not valid for DeepSpeed: {' '.join(first[:3])}") from None
    return ds


def write_config(ds_config: dict, run_dir) -> Path:
    """Keep the config DeepSpeed ran with as RUN_DIR/deepspeed_config.json."""
    path = Path(run_dir) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ds_config, indent=2, sort_keys=True) + "\n")
    return path
