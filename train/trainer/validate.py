"""Config validation, run first thing, before any process group, file or tensor exists.

Each config group's dataclass owns its rules (`validate()` in train/config/model.py and run.py; the model
constructors call the same methods); `validate_config` runs them all and adds the rules that span groups or need
the world size or the file system. Every check raises a `ConfigError` that names the offending field, its value and
how to fix it, so a bad sweep point fails in a second instead of after minutes of tokenizer training or on rank 7
of 64. Unknown keys, wrong types and unknown choices never get here: the typed config (its enums included) already
rejects them at composition.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path

from parallel.mesh import validate_parallel_config
from parallel.zero.config import check_deepspeed_config
from train.config import TrainConfig
from train.config.errors import ConfigError, check
from train.config.pipeline import check_pipeline, dp_size, refuse_pipeline
from train.config.model import MIN_CAPACITY_FACTOR  # noqa: F401 (re-exported)
from train.data import check_batch_sizes
from train.trainer.run_record import RunRecord

SANE_LR = (1e-6, 1e-2)  # AdamW peak learning rates outside this range are almost always a typo

__all__ = ["ConfigError", "config_warnings", "typed_config", "validate_config", "world_size_from_env"]


def world_size_from_env() -> int:
    """The world size torchrun will give us, known before the process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def typed_config(dcfg) -> TrainConfig:
    """DictConfig -> typed TrainConfig, turning a missing mandatory value (`???`) into a ConfigError."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    try:
        return OmegaConf.to_object(dcfg)
    except MissingMandatoryValue as e:
        raise ConfigError(f"{e.full_key} must be set (it is ??? in its config group): pass {e.full_key}=...") from e


def config_warnings(cfg: TrainConfig) -> list[str]:
    """Settings that can work but usually are mistakes: printed before any work, the run goes on."""
    found = []
    lo, hi = SANE_LR
    if not lo <= cfg.optim.lr <= hi:
        found.append(f"optim.lr={cfg.optim.lr} is outside [{lo:g}, {hi:g}], where AdamW pretraining learning rates "
                     f"lie (1e-4 to 3e-3 at scale): check for a typo")
    for name in ("capacity_factor", "device_capacity_factor"):
        c = getattr(cfg.model.moe, name)
        if c is not None and c < 1.0:
            found.append(f"model.moe.{name}={c} < 1 drops at least {1 - c:.0%} of the token assignments even when "
                         f"perfectly balanced")
    return found


def validate_config(cfg: TrainConfig, world_size: int | None = None, *, planning: bool = False) -> None:
    """Raise `ConfigError` for the first problem found in `cfg` for a run on `world_size` ranks: each group's own
    `validate()`, then the rules across groups. `planning`: the memory/time planner's layout, which may be a
    pipeline (parallel.pp_size > 1), which training refuses until pipeline execution exists."""
    world = world_size_from_env() if world_size is None else world_size
    for group in (cfg.model, cfg.parallel, cfg.precision, cfg.trainer, cfg.data, cfg.optim, cfg.logging):
        group.validate()
    check_pipeline(cfg, world)
    _validate_parallel(cfg, world)
    _validate_trainer(cfg, world)
    _validate_data(cfg)
    if not planning:
        refuse_pipeline(cfg)


def _validate_parallel(cfg: TrainConfig, world: int) -> None:
    try:  # the layout rules live with the code that builds the layout
        validate_parallel_config(cfg, world)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not _may_resume(cfg.trainer):
        # The routing groups a new run's first start resolves (the run record resolves them again, with the
        # checkpoint's value when it resumes one: then the stored groups, not this ep_size, bound the limit).
        RunRecord.resolve(cfg, world)
    stage = cfg.parallel.zero_stage
    if stage == 0:
        return
    check(world > 1, f"parallel.zero_stage={stage} partitions state over ranks, and this run has one: launch "
                     f"several with torchrun --nproc_per_node=N, or use parallel.zero_stage=0")
    check(not cfg.trainer.compile, f"trainer.compile=true is not supported with parallel.zero_stage={stage} "
                                   f"yet: use trainer.compile=false, or parallel.zero_stage=0")
    try:  # batch sizes first: the DeepSpeed config is derived from them
        accum_steps = check_batch_sizes(cfg.trainer, dp_size(cfg, world))
        check_deepspeed_config(cfg, accum_steps)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _may_resume(t) -> bool:
    """Whether the run may continue a checkpoint: `trainer.resume` is a path, or `auto` with a complete checkpoint
    in `trainer.run_dir` (a multirun job's own sub-directory is not known yet: its parent is looked at)."""
    from train.checkpoint import newest_complete

    if t.resume == "never":
        return False
    return t.resume != "auto" or (bool(t.run_dir) and newest_complete(Path(t.run_dir)) is not None)


def _validate_trainer(cfg: TrainConfig, world: int) -> None:
    t = cfg.trainer
    try:  # the data module owns the accumulation arithmetic; its message suggests sizes that would divide
        check_batch_sizes(t, dp_size(cfg, world))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check(1 <= t.seq_len <= cfg.model.max_seq_len,
          f"trainer.seq_len={t.seq_len} must be between 1 and model.max_seq_len={cfg.model.max_seq_len}")
    if t.resume not in ("auto", "never"):
        check(Path(t.resume).expanduser().exists(),
              f"trainer.resume={t.resume!r} is neither auto, never nor an existing checkpoint or run dir")
    if t.init_from is not None:
        check(Path(t.init_from).expanduser().exists(),
              f"trainer.init_from={t.init_from!r} does not exist: pass a checkpoint dir or a run dir")


def _validate_data(cfg: TrainConfig) -> None:
    d = cfg.data
    if d.source == "files":
        missing = [p for p in d.paths if not glob.glob(os.path.expanduser(p))]
        check(not missing, f"data.paths: nothing matches {missing}: fix the path(s) or the glob(s)")
    if d.tokenizer == "builtin":
        check(d.tokenizer_vocab_size <= cfg.model.vocab_size,
              f"data.tokenizer_vocab_size={d.tokenizer_vocab_size} exceeds model.vocab_size={cfg.model.vocab_size}: "
              f"token ids would not fit the embedding; lower data.tokenizer_vocab_size or raise model.vocab_size")
