"""`RunRecord`: the values a run resolves once from its config and layout, kept beside the config, never written
back into it.

- `routing_groups`: the expert blocks `model.moe.device_limit` counts (train/config/routing.py states the rule:
  the checkpoint's stored value when resuming, else this run's ep_size when a device limit is set).
- `grad_accum_steps`: global batch / (data-parallel ranks x micro-batch), from `train.data.check_batch_sizes`.
- the layout: world, data-parallel, expert-parallel and expert-data-parallel sizes.

The trainer holds one, builds the model from `model_config()` and saves it as RUN_DIR/run_record.json. For the
readers of existing files (resume, `trainer.init_from`, `train.generate`, `convert_hf.py export`), every
config.yaml the run writes (RUN_DIR/ and each checkpoint's) is `stamped()`: a copy carrying the resolved
`model.moe.routing_groups`, which is where those readers have always found it; the live config is not changed.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from train.config import ModelConfig, TrainConfig
from train.config.routing import resolve_routing_groups
from train.data import check_batch_sizes

RECORD_FILE = "run_record.json"


@dataclass(frozen=True)
class RunRecord:
    world_size: int
    dp_size: int
    ep_size: int
    edp_size: int
    grad_accum_steps: int
    routing_groups: Optional[int]
    pp_size: int = 1

    @classmethod
    def resolve(cls, cfg: TrainConfig, world_size: int, stored: Optional[ModelConfig] = None,
                stored_where: str = "the checkpoint") -> "RunRecord":
        """The record of a run of `cfg` on `world_size` ranks; `stored` is the model config of the checkpoint it
        resumes (None for a new run). Raises `ConfigError` naming the field when a value cannot be resolved."""
        ep = cfg.parallel.ep_size
        groups = resolve_routing_groups(cfg.model.moe, ep, stored.moe if stored is not None else None, stored_where)
        # every rank of a pipeline stage holds a different slice of the batch (experts are split, tokens are not);
        # the stages of one pipeline read the same slice
        dp = world_size // cfg.parallel.pp_size
        try:
            accum = check_batch_sizes(cfg.trainer, dp)
        except ValueError as e:
            from train.config.errors import ConfigError
            raise ConfigError(str(e)) from None
        return cls(world_size=world_size, dp_size=dp, ep_size=ep, edp_size=dp // ep,
                   grad_accum_steps=accum, routing_groups=groups, pp_size=cfg.parallel.pp_size)

    def model_config(self, model: ModelConfig) -> ModelConfig:
        """A copy of `model` with the resolved routing groups: what the run builds."""
        out = copy.deepcopy(model)
        out.moe.routing_groups = self.routing_groups
        return out

    def stamped(self, cfg: TrainConfig) -> TrainConfig:
        """A copy of `cfg` whose model carries the resolved values: the config.yaml the run writes."""
        return dataclasses.replace(cfg, model=self.model_config(cfg.model))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, run_dir) -> Path:
        path = Path(run_dir) / RECORD_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path
