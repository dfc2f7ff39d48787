"""The on-disk checkpoint layout and the model-weights part of it.

    RUN_DIR/checkpoints/step_00000100/
      model.safetensors   logical (unsharded) weights, keys = MoETransformer.state_dict() names
      config.yaml         the resolved TrainConfig
      tokenizer/          Hugging Face tokenizer files
      train_state*.pt     optimizer, scheduler, data position, RNG, ... (trainer-owned; absent when imported)
      CHECKSUMS.json      size and SHA-256 of every file above (train/checksums.py), verified before loading
      COMPLETE            written last: a directory without it is an interrupted save and is never resumed from

Saves go to a temporary sibling directory that is renamed into place, so a crash mid-save never leaves a
directory that looks complete and never touches an existing checkpoint.
"""
from __future__ import annotations

import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from train.checksums import ChecksumMismatch, verify_checksums, write_checksums
from train.config import TrainConfig
from train.config.routing import stored_routing_groups

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
TOKENIZER_DIR = "tokenizer"
COMPLETE_MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint path that cannot be used, with what to do about it."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(ckpt_dir: Path) -> bool:
    return (ckpt_dir / COMPLETE_MARKER).is_file() and (ckpt_dir / WEIGHTS_FILE).is_file()


def list_complete(run_or_ckpts_dir: Path) -> list[Tuple[int, Path]]:
    """(step, path) of every complete checkpoint under RUN_DIR/checkpoints (or a checkpoints dir), ascending."""
    root = Path(run_or_ckpts_dir)
    if (root / "checkpoints").is_dir():
        root = root / "checkpoints"
    found = []
    if root.is_dir():
        for child in root.iterdir():
            m = _STEP_DIR.match(child.name)
            if m and child.is_dir() and is_complete(child):
                found.append((int(m.group(1)), child))
    return sorted(found)


def newest_complete(run_dir: Path) -> Optional[Path]:
    found = list_complete(run_dir)
    return found[-1][1] if found else None


def resolve_checkpoint(path) -> Path:
    """A run dir -> its newest complete checkpoint; a checkpoint dir -> itself; anything else -> CheckpointError."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint path {p} does not exist: pass a run dir or a checkpoints/step_* dir")
    if (p / WEIGHTS_FILE).is_file():
        if not (p / COMPLETE_MARKER).is_file():
            raise CheckpointError(
                f"{p} has no {COMPLETE_MARKER} marker: the save was interrupted; use an earlier checkpoint")
        return p
    newest = newest_complete(p)
    if newest is None:
        raise CheckpointError(f"no complete checkpoint under {p} (expected {p}/checkpoints/step_*/{COMPLETE_MARKER})")
    return newest


def save_model(ckpt_dir, cfg: TrainConfig, state_dict: Dict[str, torch.Tensor],
               tokenizer_dir=None) -> Path:
    """Write weights, config and tokenizer into `ckpt_dir` (created; must not already hold a checkpoint).

    Tensors are made contiguous CPU copies; safetensors refuses shared storage, so tied weights are cloned.
    The caller writes its own extra files and then calls `mark_complete`.
    """
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / WEIGHTS_FILE).exists():
        raise CheckpointError(f"refusing to overwrite the checkpoint in {ckpt_dir}")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    save_file(tensors, str(ckpt_dir / WEIGHTS_FILE), metadata={"format": "pt", "producer": "moeforge"})
    OmegaConf.save(OmegaConf.structured(cfg), ckpt_dir / CONFIG_FILE)
    if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
        shutil.copytree(tokenizer_dir, ckpt_dir / TOKENIZER_DIR, dirs_exist_ok=True)
    return ckpt_dir


def mark_complete(ckpt_dir) -> None:
    """Record the checksums of every file, then write the COMPLETE marker (last, synced)."""
    write_checksums(ckpt_dir, skip=(COMPLETE_MARKER,))
    marker = Path(ckpt_dir) / COMPLETE_MARKER
    with open(marker, "w") as f:
        f.write("ok\n")
        f.flush()
        os.fsync(f.fileno())


def load_torch_file(path, allowed_globals=()) -> object:
    """`torch.load` that never runs code: `weights_only=True` (tensors, numbers, strings, containers) plus only
    the classes in `allowed_globals`. A file that needs anything else (a planted pickle payload, an object of an
    unknown class) is refused with a `CheckpointError` naming the file and what it tried to load."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a paragraph; the line that names the refused global is the useful one
        lines = [ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln]
        reason = lines[0] if lines else type(e).__name__
        raise CheckpointError(f"{path} was refused: loading it would construct objects other than tensors and plain "
                              f"data ({reason}), and moeforge never unpickles arbitrary objects. A file moeforge "
                              f"wrote never needs that: this one was altered or comes from elsewhere") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path} is unreadable ({e}); the checkpoint is damaged: resume from an earlier "
                              f"one with trainer.resume=<path to checkpoints/step_*>") from None


def verify_checkpoint(ckpt_dir, only=None) -> None:
    """Raise `CheckpointError` when a file of `ckpt_dir` (or of `only`) differs from its saved checksum."""
    try:
        verify_checksums(ckpt_dir, only)
    except ChecksumMismatch as e:
        raise CheckpointError(f"checkpoint {ckpt_dir} is damaged: {e}") from None


def load_config(ckpt_dir) -> TrainConfig:
    """The TrainConfig stored with a checkpoint, merged onto the schema so old files gain new defaults."""
    stored = OmegaConf.load(Path(ckpt_dir) / CONFIG_FILE)
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), stored))
    cfg.model.moe.routing_groups = stored_routing_groups(cfg.model.moe, cfg.parallel.ep_size)  # files from before it
    return cfg


def load_model(path, verify: bool = True) -> Tuple[TrainConfig, Dict[str, torch.Tensor], Optional[Path]]:
    """(config, state_dict on CPU, tokenizer dir or None) of a run dir's newest checkpoint or one checkpoint. The
    weights file is checked against its saved checksum first, unless the caller has verified it (`verify=False`)."""
    ckpt = resolve_checkpoint(path)
    if verify:
        verify_checkpoint(ckpt, only=(WEIGHTS_FILE,))
    try:
        state_dict = load_file(str(ckpt / WEIGHTS_FILE))
    except Exception as e:  # safetensors raises several types on truncated/corrupt files
        raise CheckpointError(f"{ckpt / WEIGHTS_FILE} is unreadable ({e}); the checkpoint is corrupt") from e
    tok = ckpt / TOKENIZER_DIR
    return load_config(ckpt), state_dict, (tok if tok.is_dir() else None)
