"""Typed configs for moeforge, registered in Hydra's ConfigStore so a typo in an override is an error."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from train.config.model import AttentionConfig, ModelConfig, MoEConfig, RopeConfig, RopeScalingConfig
from train.config.run import (
    DataConfig,
    Fp8Recipe,
    LoggingConfig,
    OptimConfig,
    ParallelConfig,
    PrecisionConfig,
    TrainConfig,
    TrainerConfig,
)

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")


def register_configs() -> None:
    """Register the schemas. The root config's defaults list starts with `train_schema`, so every group
    file is merged onto a typed node: unknown keys and wrong types fail at composition."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)


def compose(overrides: Sequence[str] = (), config_name: str = "train"):
    """Compose `configs/<config_name>.yaml` with overrides outside a Hydra app (tests, tools)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from hydra.errors import ConfigCompositionException

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        try:
            return hydra_compose(config_name=config_name, overrides=list(overrides))
        except ConfigCompositionException as e:
            # "Error merging override X=y" alone hides OmegaConf's reason (an enum's allowed values): add its first line
            cause = str(e.__cause__).splitlines()[0] if e.__cause__ is not None and str(e.__cause__) else ""
            if not cause or cause in str(e):
                raise
            raise ConfigCompositionException(f"{e} ({cause})") from e.__cause__


def to_train_config(cfg) -> TrainConfig:
    """DictConfig -> typed TrainConfig (dataclass instances all the way down)."""
    return OmegaConf.to_object(cfg)


def load_train_config(overrides: Sequence[str] = ()) -> TrainConfig:
    return to_train_config(compose(overrides))


__all__ = [
    "AttentionConfig", "ModelConfig", "MoEConfig", "RopeConfig", "RopeScalingConfig", "DataConfig", "Fp8Recipe",
    "LoggingConfig", "OptimConfig", "ParallelConfig", "PrecisionConfig", "TrainConfig", "TrainerConfig",
    "CONFIG_DIR", "register_configs", "compose", "to_train_config", "load_train_config",
]
