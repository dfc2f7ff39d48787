"""The on-disk checkpoint layout (drawn in this package's `__init__.py`) and the model-weights part of it.

Saves go to a temporary sibling directory that is renamed into place, so a crash mid-save never leaves a
directory that looks complete and never touches an existing checkpoint.
"""
from __future__ import annotations

import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Dict, Iterable, Iterator, Optional, Tuple

import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file

from train.checkpoint.checksums import CHECKSUM_FILE, ChecksumMismatch, verify_checksums, write_checksums
from train.config import TrainConfig
from train.config.routing import stored_routing_groups

# `train.checkpoint.sharded` (torch.distributed.checkpoint: ~1 s of imports) is imported by the functions that read
# the sharded format, so a start, a dry run or a tool that never reads one does not pay for it.

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
# Schema fields removed since checkpoints stored them: dropped when an older config.yaml is read.
REMOVED_KEYS = ("model.moe.router_dtype",)
TOKENIZER_DIR = "tokenizer"
COMPLETE_MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint path that cannot be used, with what to do about it."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def has_weights(ckpt_dir: Path) -> bool:
    """Whether `ckpt_dir` holds model weights in either format (sharded state/ or model.safetensors)."""
    from train.checkpoint import sharded

    return (Path(ckpt_dir) / WEIGHTS_FILE).is_file() or sharded.has_state(ckpt_dir)


def is_complete(ckpt_dir: Path) -> bool:
    return (ckpt_dir / COMPLETE_MARKER).is_file() and has_weights(ckpt_dir)


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
    if has_weights(p):
        if not (p / COMPLETE_MARKER).is_file():
            raise CheckpointError(
                f"{p} has no {COMPLETE_MARKER} marker: the save was interrupted; use an earlier checkpoint")
        check_contained(p)
        return p
    newest = newest_complete(p)
    if newest is None:
        raise CheckpointError(f"no complete checkpoint under {p} (expected {p}/checkpoints/step_*/{COMPLETE_MARKER})")
    check_contained(newest)
    return newest


def save_run_files(ckpt_dir, cfg: TrainConfig, tokenizer_dir=None) -> None:
    """The config and tokenizer that every checkpoint carries next to its weights."""
    save_config(ckpt_dir, cfg)
    copy_tokenizer(ckpt_dir, tokenizer_dir)


def save_config(ckpt_dir, cfg: TrainConfig) -> None:
    OmegaConf.save(OmegaConf.structured(cfg), Path(ckpt_dir) / CONFIG_FILE)


def copy_tokenizer(ckpt_dir, tokenizer_dir) -> None:
    if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
        shutil.copytree(tokenizer_dir, Path(ckpt_dir) / TOKENIZER_DIR, dirs_exist_ok=True)


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
    save_run_files(ckpt_dir, cfg, tokenizer_dir)
    return ckpt_dir


def mark_complete(ckpt_dir, known_checksums: Optional[dict] = None) -> None:
    """Record the checksums of every file (those in `known_checksums` were hashed by the ranks that wrote
    them), then write the COMPLETE marker (last, synced)."""
    write_checksums(ckpt_dir, skip=(COMPLETE_MARKER,), known=known_checksums)
    write_marker(ckpt_dir)


def write_marker(ckpt_dir) -> None:
    """The COMPLETE marker, synced: the last file of a checkpoint."""
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
    """Raise `CheckpointError` when `ckpt_dir` reaches outside itself (a symlink) or a file of it (or of `only`)
    differs from its saved checksum. A sharded checkpoint without `CHECKSUMS.json` is damaged (every one was
    saved with it); an imported `model.safetensors` one from before checksums gets the checks its format allows."""
    from train.checkpoint import sharded

    check_contained(ckpt_dir)
    try:
        verified = verify_checksums(ckpt_dir, only)
    except ChecksumMismatch as e:
        raise CheckpointError(f"checkpoint {ckpt_dir} is damaged: {e}") from None
    if verified and sharded.has_state(ckpt_dir):
        try:  # the index names only files of its own directory, each as long as the index says
            sharded.check_file_sizes(ckpt_dir)
        except sharded.ShardedCheckpointError as e:
            raise CheckpointError(f"checkpoint {ckpt_dir} is damaged: {e}") from None
    if verified:
        return
    if sharded.has_state(ckpt_dir):
        raise CheckpointError(f"checkpoint {ckpt_dir} is damaged: its {CHECKSUM_FILE} is missing, and every "
                              f"checkpoint with sharded state was saved with one (deleted?); its files cannot be "
                              f"trusted")
    if (Path(ckpt_dir) / WEIGHTS_FILE).is_file():
        try:
            weight_names(ckpt_dir)  # the safetensors header, checked against the file's size
        except Exception as e:  # safetensors raises its own error types on a truncated header
            raise CheckpointError(f"checkpoint {ckpt_dir} is damaged: {ckpt_dir / WEIGHTS_FILE} is unreadable "
                                  f"({e})") from None


def check_contained(ckpt_dir) -> None:
    """Refuse a checkpoint holding a symbolic link that leads outside it: everything a checkpoint is read from
    must be inside its directory (a planted link would otherwise be read, hashed or loaded)."""
    root = Path(os.path.realpath(ckpt_dir))
    for dirpath, dirnames, filenames in os.walk(root):  # links are listed, never followed
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path.is_symlink():
                target = Path(os.path.realpath(path))
                if target != root and root not in target.parents:
                    raise CheckpointError(f"{path} is a symbolic link to {target}, outside the checkpoint: refused "
                                          f"(a checkpoint is read only from inside {root}); copy the file in instead")


def load_config(ckpt_dir) -> TrainConfig:
    """The TrainConfig stored with a checkpoint, merged onto the schema so old files gain new defaults."""
    stored = OmegaConf.load(Path(ckpt_dir) / CONFIG_FILE)
    for key in REMOVED_KEYS:  # fields older files hold that the schema dropped (they were never read)
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(stored, parent)
        if node is not None and leaf in node:
            node.pop(leaf)
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), stored))
    cfg.model.moe.routing_groups = stored_routing_groups(cfg.model.moe, cfg.parallel.ep_size)  # files from before it
    return cfg


def weight_names(ckpt_dir) -> list[str]:
    """The logical weight names a checkpoint holds (either format), without reading any tensor."""
    from train.checkpoint import sharded

    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / WEIGHTS_FILE).is_file():
        with safe_open(str(ckpt_dir / WEIGHTS_FILE), framework="pt") as f:
            return list(f.keys())
    return sharded.logical_weight_names(ckpt_dir)


def weight_shapes(ckpt_dir) -> dict[str, tuple]:
    """name → logical shape of every weight a checkpoint holds, from its headers or index (no tensor read)."""
    return {k: v[0] for k, v in _weight_index(ckpt_dir).items()}


def weight_dtypes(ckpt_dir) -> list:
    return [v[1] for v in _weight_index(ckpt_dir).values()]


def _weight_index(ckpt_dir) -> dict[str, tuple]:
    from train.checkpoint import sharded

    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / WEIGHTS_FILE).is_file():
        out = {}
        with safe_open(str(ckpt_dir / WEIGHTS_FILE), framework="pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                out[k] = (tuple(sl.get_shape()), _SAFETENSORS_DTYPES[sl.get_dtype()])
        return out
    idx = sharded.index(ckpt_dir)
    out = {}
    for name in sharded.logical_weight_names(ckpt_dir):
        if sharded.model_key(name) in idx:
            out[name] = idx[sharded.model_key(name)]
        else:
            count = sum(1 for k in idx if k.startswith(sharded.model_key(name) + "/expert/"))
            shape, dtype = idx[sharded.model_key(name, 0)]
            out[name] = ((count, *shape), dtype)
    return out


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32, "BOOL": torch.bool, "U8": torch.uint8,
                       "I8": torch.int8, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def iter_weights(ckpt_dir, names: Optional[Iterable[str]] = None) -> Iterator[Tuple[str, torch.Tensor]]:
    """(name, logical CPU tensor) of a checkpoint's weights, one at a time (either format), so a consumer that
    converts or copies each tensor never holds two copies of the model."""
    from train.checkpoint import sharded

    ckpt_dir = Path(ckpt_dir)
    try:
        if (ckpt_dir / WEIGHTS_FILE).is_file():
            with safe_open(str(ckpt_dir / WEIGHTS_FILE), framework="pt") as f:
                for name in (list(names) if names is not None else list(f.keys())):
                    yield name, f.get_tensor(name)
        else:
            yield from sharded.iter_logical_weights(ckpt_dir, names)
    except CheckpointError:
        raise
    except Exception as e:  # safetensors and DCP raise several types on truncated/corrupt files
        raise CheckpointError(f"the weights in {ckpt_dir} are unreadable ({e}); the checkpoint is corrupt") from e


def load_model(path, verify: bool = True) -> Tuple[TrainConfig, Dict[str, torch.Tensor], Optional[Path]]:
    """(config, state_dict on CPU, tokenizer dir or None) of a run dir's newest checkpoint or one checkpoint. The
    weight files are checked against their saved checksums first, unless the caller has verified them
    (`verify=False`). Tied weights appear under both names, as in the model's `state_dict()`."""
    ckpt = resolve_checkpoint(path)
    if verify:
        verify_checkpoint(ckpt, only=weight_files(ckpt))
    cfg = load_config(ckpt)
    state_dict = dict(iter_weights(ckpt))
    if cfg.model.tie_embeddings and "embed.weight" in state_dict:
        state_dict.setdefault("lm_head.weight", state_dict["embed.weight"])
    tok = ckpt / TOKENIZER_DIR
    return cfg, state_dict, (tok if tok.is_dir() else None)


def weight_files(ckpt_dir) -> list[str]:
    """The files (relative paths) that hold a checkpoint's weights: what to verify before reading them."""
    from train.checkpoint import sharded

    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / WEIGHTS_FILE).is_file():
        return [WEIGHTS_FILE]
    state = ckpt_dir / sharded.STATE_DIR
    return sorted(p.relative_to(ckpt_dir).as_posix() for p in state.iterdir() if p.is_file())
