"""`python -m train [overrides]` / `torchrun ... -m train [overrides]`: compose the config, validate it,
initialise distributed, build, train, close. Everything else lives in `train/trainer/`."""
from __future__ import annotations

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from train.checkpoint import CheckpointError
from train.config import CONFIG_DIR, register_configs
from train.trainer import typed_config, validate_config
from train.trainer.validate import ConfigError, config_warnings
from train.trainer.init_from import apply_init_from

register_configs()


def job_run_dir(cfg) -> str:
    """This job's run dir: `trainer.run_dir`, else Hydra's output dir. In a multirun every job would share an
    explicit `trainer.run_dir` and resume the previous job's checkpoints, so each job gets `run_dir/<job number>`."""
    hydra_cfg = HydraConfig.get()
    if not cfg.trainer.run_dir:
        return hydra_cfg.runtime.output_dir
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return os.path.join(cfg.trainer.run_dir, str(hydra_cfg.job.num))
    return cfg.trainer.run_dir


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    cfg = typed_config(dcfg)
    try:
        apply_init_from(cfg, HydraConfig.get().overrides.task)  # the checkpoint's architecture, before validation
        validate_config(cfg)  # before any process group, file or tensor exists
        if os.environ.get("RANK", "0") == "0":
            for warning in config_warnings(cfg):
                print(f"moeforge: warning: {warning}", file=sys.stderr)
    except (ConfigError, CheckpointError) as e:  # the message names the field and the fix; a traceback adds nothing
        sys.exit(f"moeforge: {e}")

    import parallel
    from train.trainer.health import TrainingStopped
    from train.trainer.loop import Trainer

    mesh = parallel.init_distributed(cfg)
    # Without trainer.run_dir each rank's Hydra picks a timestamped dir; rank 0's is the run's.
    cfg.trainer.run_dir = parallel.broadcast_object(job_run_dir(cfg), mesh)
    trainer = None
    try:
        trainer = Trainer(cfg, mesh)
        trainer.fit()
    except (ConfigError, CheckpointError, TrainingStopped) as e:  # a tampered checkpoint, too many bad steps, ...
        sys.exit(f"moeforge: {e}")
    finally:
        if trainer is not None:
            trainer.close()
        parallel.shutdown(mesh)


if __name__ == "__main__":
    main()
