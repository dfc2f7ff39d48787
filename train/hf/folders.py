"""HF folder I/O: read the safetensors weights of a folder, write sharded safetensors as `save_pretrained`
does, copy a tokenizer."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch

from train.hf.errors import HFConversionError
from train.hf.weights import StateDict

# Files a Hugging Face tokenizer folder may hold (AutoTokenizer reads whichever are present).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


def read_hf_weights(hf_dir: Path) -> StateDict:
    """All tensors of an HF folder: `model.safetensors`, or the shards a `*.safetensors.index.json` lists,
    or any `*.safetensors` files present."""
    from safetensors.torch import load_file

    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    if (hf_dir / "model.safetensors").is_file():
        files = [hf_dir / "model.safetensors"]
    elif index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [hf_dir / s for s in shards]
        outside = [s for s, f in zip(shards, files) if f.resolve().parent != hf_dir.resolve()]
        if outside:  # an index is input like any other: it names files of this folder, nothing elsewhere
            raise HFConversionError(f"{index} names shard files outside {hf_dir}: {outside[:3]}")
    else:
        files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise HFConversionError(
            f"no safetensors weights in {hf_dir} (expected model.safetensors or an index with shards); "
            "PyTorch .bin checkpoints are not supported: re-save them with save_pretrained(safe_serialization=True)")
    state: StateDict = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


class ShardedSafetensorsWriter:
    """Writes tensors as they come into safetensors shards of at most `max_shard_bytes` (one tensor larger than
    that gets a shard of its own); `finish()` names them as `save_pretrained` does: one `model.safetensors` when
    everything fits in one, else `model-0000i-of-0000N.safetensors` plus `model.safetensors.index.json`."""

    def __init__(self, out_dir: Path, max_shard_bytes: int):
        self.out, self.max = Path(out_dir), max_shard_bytes
        self.pending: dict = {}
        self.pending_bytes = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if any(name in keys for _, keys in self.files) or name in self.pending:
            return  # already written (the same tensor reached from two blocks)
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max:
            self._flush()
        self.pending[name] = tensor.detach().to("cpu").contiguous().clone()  # unshared: safetensors refuses views
        self.pending_bytes += size
        self.total += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.out / f".shard{len(self.files):05d}.tmp"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.files.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        if self.pending or not self.files:
            self._flush()
        if len(self.files) == 1:
            self.files[0][0].rename(self.out / "model.safetensors")
            return
        n, weight_map = len(self.files), {}
        for i, (path, keys) in enumerate(self.files, 1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(self.out / name)
            weight_map.update({k: name for k in keys})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def copy_tokenizer_files(src: Optional[Path], dst: Path) -> bool:
    """Copy the tokenizer files found in `src` into `dst`; True when a tokenizer was copied."""
    if src is None or not Path(src).is_dir():
        return False
    copied = False
    for name in TOKENIZER_FILES:
        f = Path(src) / name
        if f.is_file():
            Path(dst).mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, Path(dst) / name)
            copied = True
    return copied


def refuse_remote_code(folder: Path, what: str, error: type = HFConversionError) -> None:
    """Refuse, with one line, a folder whose `tokenizer_config.json` or `config.json` asks transformers to run code
    shipped with it (`auto_map`, `trust_remote_code`): moeforge never runs such code. Only files inside `folder` are
    read (a file that is a link leading elsewhere is refused unread)."""
    root = Path(folder).resolve()
    for name in ("tokenizer_config.json", "config.json"):
        path = Path(folder) / name
        if not path.is_file():
            continue
        if root not in path.resolve().parents:
            raise error(f"{path} is a link to {path.resolve()}, outside {folder}: refused (a {what} is read only "
                        f"from inside its folder)")
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise error(f"{path} is unreadable ({e}): not a usable {what}") from None
        if isinstance(config, dict) and (config.get("auto_map") or config.get("trust_remote_code")):
            key = "auto_map" if config.get("auto_map") else "trust_remote_code"
            raise error(f"{path} asks for code shipped with the {what} ({key}): refused, moeforge never runs code "
                        f"from a model or tokenizer folder; use a {what} that the installed transformers loads "
                        f"without it")
