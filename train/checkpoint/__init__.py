"""Checkpoints: the on-disk layout, checksums, sharded I/O and the trainer's save/resume (docs/ARCHITECTURE.md).

    RUN_DIR/checkpoints/step_00000100/
      state/              sharded weights and optimizer state in logical coordinates, one file per rank plus
                          an index (sharded.py): what training writes
      model.safetensors   logical (unsharded) weights, keys = MoETransformer.state_dict() names: what
                          `convert_hf.py import` and `scripts/upcycle.py` write (a checkpoint has one or the other)
      config.yaml         the resolved TrainConfig
      tokenizer/          Hugging Face tokenizer files
      train_state*.pt     scheduler, data position, RNG, ... (save_resume.py; absent when imported)
      CHECKSUMS.json      size and SHA-256 of every file above (checksums.py), verified before loading
      COMPLETE            written last: a directory without it is an interrupted save and is never resumed from

Who owns what:
- `layout.py`: the directory layout, finding and verifying checkpoints, safe loading, and the model-weights API
  (either format); its public names are re-exported here (`from train import checkpoint as ckpt_io`).
- `checksums.py`: `CHECKSUMS.json`.
- `save_errors.py`: a save that fails part-way: one line naming the file, the same outcome on every rank.
- `sharded.py`: the DCP files under `state/`, in logical coordinates. Collective over the world (it checks
  `dist.is_initialized`), it names no process group.
- `save_resume.py`: the trainer's glue, saving and resuming a `TrainState`. Not imported here, so that this package
  stays importable from `train.trainer` without a cycle: import it by name.
`parallel/state_dict.py` (gathering the logical state dict over the EP group) stays in `parallel/`, because it
names a process group, which only `parallel/` may.
"""
from train.checkpoint.layout import (
    TOKENIZER_DIR, CheckpointError, iter_weights, load_config, load_model, load_torch_file, mark_complete,
    newest_complete, resolve_checkpoint, save_model, verify_checkpoint, weight_dtypes, weight_files, weight_names,
    weight_shapes,
)

__all__ = [
    "TOKENIZER_DIR", "CheckpointError", "iter_weights", "load_config", "load_model", "load_torch_file",
    "mark_complete", "newest_complete", "resolve_checkpoint", "save_model", "verify_checkpoint", "weight_dtypes",
    "weight_files", "weight_names", "weight_shapes",
]
