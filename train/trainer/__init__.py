"""The training loop around a built model: validation, state, optimizer, schedule, precision, metrics,
logging and checkpointing (save/resume: `train.checkpoint.save_resume`). `train.trainer.loop.Trainer` is the entry
point; `python -m train` drives it.
This package init stays light (no torch/data imports) so config validation runs before anything heavy."""
from train.trainer.validate import ConfigError, typed_config, validate_config

__all__ = ["ConfigError", "typed_config", "validate_config"]
