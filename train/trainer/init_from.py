"""`trainer.init_from=DIR`: the model architecture and tokenizer come from the checkpoint, not from `model=`.

The rule (the one place it is stated; the Trainer and `python -m train` follow it):

- The run's `model` config becomes the checkpoint's `config.yaml` model config: shapes, attention, rope,
  MoE shapes and scoring, `mtp_depth`, `family`. Whatever `model=NAME` composed is ignored (and logged).
- Training-only knobs (the schema's fields marked `knob`, collected in `TRAINING_KNOBS`: balance and router loss
  coefficients, `bias_update_rate`, the capacity factors, `device_limit`, noisy top-k / Switch / BASE training
  settings, `mtp_loss_weight`, `loss_chunk_tokens`, `max_seq_len`, `init_std`, `name`) also come from the
  checkpoint, except those the user set explicitly as `model.<field>=...` on the command line: those win.
- An explicit command-line `model.<field>=...` for any other (architecture) field must agree with the
  checkpoint; a different value is a `ConfigError` naming the field.
- `moe.routing_groups` is architecture (it decides which experts a device-limited token may use), except that a
  checkpoint storing null (no device limit was ever resolved) takes the command line's value, or is resolved to
  this run's ep_size at its first start (train/config/routing.py).
- `model.moe.bias_update_rate=0` on a checkpoint that holds expert selection biases is an error (it would
  drop the biases and change routing); a positive rate on a checkpoint without them starts them at zero.
- With `data.tokenizer=builtin` and a `tokenizer/` in the checkpoint, the run trains with the checkpoint's
  tokenizer (`data.tokenizer` becomes that directory); a named tokenizer is kept as given.
- This applies whether or not the run resumes: `trainer.resume` still wins for the weights (a complete
  checkpoint in `run_dir` is resumed and init_from's weights are not loaded), and re-running the same command
  resolves the same architecture, so the resume checkpoint fits.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
from pathlib import Path
from typing import Iterable, List, Sequence

from omegaconf import OmegaConf

from train.config import ModelConfig, TrainConfig
from train.config.model import training_knobs
from train.trainer.validate import ConfigError

log = logging.getLogger("train")

# Architecture fields a checkpoint may leave unresolved (null): the run's value is taken then.
RESOLVED_ONCE = ("moe.routing_groups",)

# The fields marked `knob` in the schema (train/config/model.py: `knob(...)`), as `model.`-relative paths.
TRAINING_KNOBS = training_knobs()


def explicit_model_fields(overrides: Iterable[str]) -> List[str]:
    """`model.`-relative paths the command line sets (`model.moe.top_k=4` -> `moe.top_k`); `model=NAME` is a
    group choice, not a field, and is left out."""
    fields = []
    for item in overrides:
        key = item.lstrip("~+").split("=", 1)[0].split("@", 1)[0].strip()
        if key.startswith("model."):
            fields.append(key[len("model."):])
    return fields


def _leaves(node, prefix: str = "") -> dict:
    """Flat {dotted path: value} of a dataclass config (None sub-configs are one leaf)."""
    out = {}
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_leaves(value, prefix + f.name + "."))
        else:
            out[prefix + f.name] = value
    return out


def _select(model: ModelConfig, path: str):
    value = OmegaConf.select(OmegaConf.structured(model), path, default=None)
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def _set(model: ModelConfig, path: str, value) -> None:
    *parents, last = path.split(".")
    node = model
    for p in parents:
        node = getattr(node, p)
    setattr(node, last, value)


def merge_model_config(run: ModelConfig, ckpt: ModelConfig, explicit: Sequence[str], where: str) -> ModelConfig:
    """The model config a run initialised from a checkpoint trains with (the rule in this module's docstring)."""
    merged = copy.deepcopy(ckpt)
    for path in explicit:
        covered = [k for k in TRAINING_KNOBS if k == path or k.startswith(path + ".")]
        for knob in covered:
            _set(merged, knob, copy.deepcopy(_select(run, knob)))
        if path in TRAINING_KNOBS:
            continue
        mine, theirs = _select(run, path), _select(ckpt, path)
        if path in RESOLVED_ONCE and theirs is None:
            _set(merged, path, mine)
            continue
        if isinstance(mine, dict) and isinstance(theirs, dict):  # a whole sub-config: knobs were taken above
            for knob in covered:
                mine.pop(knob[len(path) + 1:], None)
                theirs.pop(knob[len(path) + 1:], None)
        if mine != theirs:
            raise ConfigError(
                f"model.{path}={mine!r} contradicts trainer.init_from: the checkpoint {where} has model.{path}="
                f"{theirs!r}, and init_from takes the architecture from the checkpoint. Drop the model.{path} "
                f"override (or train from scratch without trainer.init_from)")
    if ckpt.moe.uses_expert_bias and not merged.moe.uses_expert_bias:
        raise ConfigError(
            f"model.moe.bias_update_rate={merged.moe.bias_update_rate} would drop the expert selection biases of "
            f"the checkpoint {where} (they change which experts tokens pick): keep a positive rate (the "
            f"checkpoint's is {ckpt.moe.bias_update_rate})")
    return merged


def apply_init_from(cfg: TrainConfig, overrides: Iterable[str] = ()) -> List[str]:
    """Rewrite `cfg.model` (and `cfg.data.tokenizer`) for `trainer.init_from`, in place; `overrides` are the
    command-line overrides (to tell the knobs the user set). Returns the log lines describing what was taken
    (also logged). A no-op without init_from."""
    from train.checkpoint import CheckpointError, load_config, resolve_checkpoint

    if cfg.trainer.init_from is None:
        return []
    try:
        ckpt_dir = resolve_checkpoint(cfg.trainer.init_from)
        ckpt_cfg = load_config(ckpt_dir)
    except (CheckpointError, OSError) as e:
        raise ConfigError(f"trainer.init_from={cfg.trainer.init_from!r}: {e}") from e
    composed = cfg.model
    cfg.model = merge_model_config(composed, ckpt_cfg.model, explicit_model_fields(overrides), str(ckpt_dir))

    before, after = _leaves(composed), _leaves(cfg.model)
    changed = [f"{k}={after[k]!r} (model= gave {before[k]!r})" for k in after if before.get(k) != after[k]]
    notes = [f"trainer.init_from: architecture from {ckpt_dir}/config.yaml (family {cfg.model.family}, "
             f"{cfg.model.num_layers} layers, d_model {cfg.model.d_model}, {cfg.model.moe.num_routed_experts} "
             f"routed experts, mtp_depth {cfg.model.mtp_depth})"
             + (f"; differs from the composed model: {', '.join(changed)}" if changed else "")]
    tok_dir = Path(ckpt_dir) / "tokenizer"
    if cfg.data.tokenizer == "builtin" and tok_dir.is_dir():
        cfg.data.tokenizer = str(tok_dir)
        notes.append(f"trainer.init_from: training with the checkpoint's tokenizer {tok_dir} (data.tokenizer)")
    if os.environ.get("RANK", "0") == "0":  # before the process group exists: torchrun's rank
        for line in notes:
            log.info(line)
    return notes
