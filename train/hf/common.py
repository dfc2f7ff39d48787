"""Shared machinery of the Hugging Face converters: the error type, one bidirectional table per family for
config fields and for 1:1 weights, expert (un)stacking, and HF folder I/O.

Shape legend: E experts, D model dim, F expert hidden.

A family module (mixtral.py, dbrx.py, deepseek.py) describes its mapping once, as `Field` and `Weight`
tables that both directions read, plus the few transforms a table cannot say (fused projections, expert
layouts, rope scaling). `convert.py` drives the modules.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch

from train.config.routing import device_limit_groups

StateDict = Dict[str, torch.Tensor]

# Files a Hugging Face tokenizer folder may hold (AutoTokenizer reads whichever are present).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


class HFConversionError(ValueError):
    """A checkpoint or HF folder that cannot be converted, saying what is unsupported and what is."""


# ---------------------------------------------------------------------------------------------------------
# Config fields: one table per family, read in both directions.
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """`ours` (dotted path into ModelConfig) ↔ `hf` (dotted path into the HF config; sub-configs nest).

    `to_hf` / `from_hf` convert the value when the two sides differ in type or meaning.
    """

    ours: str
    hf: str
    to_hf: Callable[[Any], Any] = lambda v: v
    from_hf: Callable[[Any], Any] = lambda v: v


# The top-level fields that transformers' Llama-style configs (Mixtral, DeepSeek-V2/V3) name alike.
LLAMA_STYLE_FIELDS = (
    Field("vocab_size", "vocab_size"),
    Field("d_model", "hidden_size"),
    Field("num_layers", "num_hidden_layers"),
    Field("max_seq_len", "max_position_embeddings"),
    Field("norm_eps", "rms_norm_eps"),
    Field("tie_embeddings", "tie_word_embeddings"),
    Field("init_std", "initializer_range"),
)


def get_path(obj: Any, path: str) -> Any:
    """`a.b.c` of nested objects or dicts."""
    for part in path.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


def set_path(obj: Any, path: str, value: Any) -> None:
    """Set `a.b.c` on nested objects or dicts, creating intermediate dicts."""
    *parents, last = path.split(".")
    for part in parents:
        if isinstance(obj, dict):
            obj = obj.setdefault(part, {})
        else:
            obj = getattr(obj, part)
    if isinstance(obj, dict):
        obj[last] = value
    else:
        setattr(obj, last, value)


def fields_to_hf(fields: Iterable[Field], cfg: Any) -> dict:
    """HF config kwargs (nested dicts for sub-configs) from our ModelConfig."""
    out: dict = {}
    for f in fields:
        set_path(out, f.hf, f.to_hf(get_path(cfg, f.ours)))
    return out


def fields_from_hf(fields: Iterable[Field], hf_config: Any, cfg: Any) -> None:
    """Fill our ModelConfig `cfg` in place from a loaded HF config object."""
    for f in fields:
        set_path(cfg, f.ours, f.from_hf(get_path(hf_config, f.hf)))


def require(ok: bool, family: str, what: str) -> None:
    """Raise a clear error naming the family when the HF class cannot represent a setting."""
    if not ok:
        raise HFConversionError(f"cannot export a {family!r} model to Hugging Face: {what}")


# ---------------------------------------------------------------------------------------------------------
# Weights: 1:1 renames from one table, plus transforms the family modules add.
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Weight:
    """One tensor that maps 1:1: our name ↔ HF name, `{i}` standing for the layer index (templates)."""

    ours: str
    hf: str


# The tensors every Llama-style HF class (Mixtral, Llama, Mistral, Qwen2/3(-MoE), OLMoE, Llama 4, DeepSeek) names
# alike: the embedding, final norm and head, and per layer the two pre-norms and the q/k/v/o projections.
LLAMA_STYLE_WEIGHTS = (
    Weight("embed.weight", "model.embed_tokens.weight"),
    Weight("norm.weight", "model.norm.weight"),
    Weight("lm_head.weight", "lm_head.weight"),
)
LLAMA_STYLE_NORM_WEIGHTS = (
    Weight("{p}attn_norm.weight", "{h}input_layernorm.weight"),
    Weight("{p}ffn_norm.weight", "{h}post_attention_layernorm.weight"),
)
LLAMA_STYLE_LAYER_WEIGHTS = (
    *LLAMA_STYLE_NORM_WEIGHTS,
    *(Weight(f"{{p}}attn.{n}_proj.weight", f"{{h}}self_attn.{n}_proj.weight") for n in "qkvo"),
)


def rename_to_hf(table: Iterable[Weight], src: StateDict, dst: StateDict, **fmt: Any) -> None:
    """Copy every table entry present in `src` (our names) into `dst` under its HF name."""
    for w in table:
        key = w.ours.format(**fmt)
        if key in src:
            dst[w.hf.format(**fmt)] = src[key]


def rename_from_hf(table: Iterable[Weight], src: StateDict, dst: StateDict, **fmt: Any) -> None:
    """Move every table entry present in `src` (HF names) into `dst` under our name (popped from `src`, so
    what is left at the end is what no table consumed)."""
    for w in table:
        key = w.hf.format(**fmt)
        if key in src:
            dst[w.ours.format(**fmt)] = src.pop(key)


def split_experts(sd: StateDict) -> StateDict:
    """Our stacked experts (`experts.w_gate_up_EHD` (E, 2F, D), `experts.w_down_EDF` (E, D, F), Linear layout)
    as the per-projection (E, in, out) tensors the family converters map: `experts.w_gate_EDF`,
    `experts.w_up_EDF` (E, D, F) and `experts.w_down_EFD` (E, F, D). Views, no copies; other keys pass."""
    out: StateDict = {}
    for k, v in sd.items():
        if k.endswith("experts.w_gate_up_EHD"):
            base, f = k[: -len("w_gate_up_EHD")], v.shape[1] // 2
            out[base + "w_gate_EDF"], out[base + "w_up_EDF"] = v[:, :f].transpose(1, 2), v[:, f:].transpose(1, 2)
        elif k.endswith("experts.w_down_EDF"):
            out[k[: -len("w_down_EDF")] + "w_down_EFD"] = v.transpose(1, 2)
        else:
            out[k] = v
    return out


def fuse_experts(sd: StateDict) -> StateDict:
    """Inverse of `split_experts`: the converters' per-projection tensors as our stacked experts."""
    out: StateDict = {}
    for k, v in sd.items():
        if k.endswith("experts.w_gate_EDF"):
            base = k[: -len("w_gate_EDF")]
            up = sd[base + "w_up_EDF"]
            out[base + "w_gate_up_EHD"] = torch.cat([v, up], dim=2).transpose(1, 2).contiguous()
        elif k.endswith("experts.w_down_EFD"):
            out[k[: -len("w_down_EFD")] + "w_down_EDF"] = v.transpose(1, 2).contiguous()
        elif not k.endswith("experts.w_up_EDF"):
            out[k] = v
    return out


def experts_to_linears(w_EIO: torch.Tensor) -> List[torch.Tensor]:
    """Stacked (E, in, out) → E `nn.Linear` weights (out, in)."""
    return [w.t().contiguous() for w in w_EIO.unbind(0)]


def experts_from_linears(weights: List[torch.Tensor]) -> torch.Tensor:
    """E `nn.Linear` weights (out, in) → stacked (E, in, out)."""
    return torch.stack([w.t() for w in weights]).contiguous()


def pop_indexed(hf: StateDict, template: str, count: int) -> List[torch.Tensor]:
    """`template.format(j=j)` for j < count, removed from `hf`; a clear error when one is missing."""
    out = []
    for j in range(count):
        key = template.format(j=j)
        if key not in hf:
            raise HFConversionError(f"missing tensor {key} in the Hugging Face weights")
        out.append(hf.pop(key))
    return out


def check_shapes(expected: StateDict, got: StateDict, where: str) -> None:
    """Every expected key present with the same shape, and no unexpected keys; else a clear error."""
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    bad = sorted(k for k in set(expected) & set(got) if tuple(expected[k].shape) != tuple(got[k].shape))
    problems = []
    if missing:
        problems.append(f"missing {_head(missing)}")
    if extra:
        problems.append(f"unexpected {_head(extra)}")
    if bad:
        problems.append("shape mismatch " + ", ".join(
            f"{k}: expected {tuple(expected[k].shape)}, got {tuple(got[k].shape)}" for k in bad[:5]))
    if problems:
        raise HFConversionError(f"{where}: " + "; ".join(problems))


def _head(keys: List[str], n: int = 8) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


# ---------------------------------------------------------------------------------------------------------
# HF folder I/O
# ---------------------------------------------------------------------------------------------------------


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


def write_hf_weights(state: StateDict, out_dir: Path) -> None:
    """One `model.safetensors` with contiguous, unshared CPU tensors (format=pt metadata, as HF writes)."""
    from safetensors.torch import save_file

    seen: dict = {}
    tensors = {}
    for k, v in state.items():
        v = v.detach().to("cpu").contiguous()
        ptr = (v.data_ptr(), v.numel())
        tensors[k] = v.clone() if ptr in seen else v  # safetensors rejects shared storage (tied weights)
        seen[ptr] = k
    save_file(tensors, str(Path(out_dir) / "model.safetensors"), metadata={"format": "pt"})


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


def layer_index(key: str, prefix: str) -> Optional[int]:
    """The layer number of `prefix{N}.` keys, else None."""
    m = re.match(re.escape(prefix) + r"(\d+)\.", key)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------------------------------------
# Checks and settings several families share
# ---------------------------------------------------------------------------------------------------------


def check_llama_style_gqa(cfg: Any, family: str) -> None:
    """Grouped-query attention with rotate-half RoPE and no bias, as Mixtral and DBRX compute it."""
    a = cfg.attention
    require(a.kind == "gqa", family, f"attention.kind={a.kind!r} (only gqa)")
    require(not a.bias and not a.qkv_bias, family, "attention.bias / qkv_bias=true (the HF class has no attention "
                                                   "biases)")
    require(a.qk_norm is None, family, f"attention.qk_norm={a.qk_norm!r} (the HF class has no q/k norm)")
    require(not cfg.rope.interleaved, family,
            "rope.interleaved=true (the HF class rotates the two halves of each head, not adjacent pairs)")


def check_topk_softmax_routing(cfg: Any, family: str) -> None:
    """Mixtral/DBRX routing: softmax over the chosen top-k (equivalently, renormalised top-k probabilities),
    every layer MoE, no shared experts, groups, expert bias or scaling."""
    m = cfg.moe
    require(m.scoring == "topk_softmax" or (m.scoring == "softmax_topk" and m.norm_topk_prob), family,
            f"moe.scoring={m.scoring!r} with norm_topk_prob={m.norm_topk_prob} (the HF class renormalises the "
            "top-k softmax probabilities: topk_softmax, or softmax_topk with norm_topk_prob)")
    require(m.num_shared_experts == 0, family, "moe.num_shared_experts > 0 (no shared experts in the HF class)")
    require(m.first_k_dense == 0 and m.layer_freq == 1, family,
            "dense layers (moe.first_k_dense / moe.layer_freq): every layer of the HF class is MoE")
    require(m.num_groups == 1, family, "moe.num_groups > 1 (group-limited routing is DeepSeek's)")
    require(device_limit_groups(m) is None, family,
            "moe.device_limit below moe.routing_groups (device-limited routing is DeepSeek-V2's)")
    require(m.routed_scaling_factor == 1.0, family, "moe.routed_scaling_factor != 1")
    require(not m.uses_expert_bias, family, "moe.bias_update_rate > 0 (expert selection bias is DeepSeek-V3's)")
    require(m.capacity_factor is None, family, "moe.capacity_factor is set (HF inference is dropless)")


def set_topk_softmax_routing(cfg: Any) -> None:
    """The routing settings `check_topk_softmax_routing` accepts, for an import."""
    m = cfg.moe
    m.scoring, m.norm_topk_prob, m.routed_scaling_factor = "topk_softmax", True, 1.0
    m.granularity, m.num_shared_experts, m.first_k_dense, m.layer_freq = 1, 0, 0, 1
    m.num_groups, m.topk_groups, m.bias_update_rate, m.capacity_factor = 1, 1, 0.0, None


def require_silu(hf: Any, model_type: str, attr: str = "hidden_act") -> None:
    act = get_path(hf, attr)
    if isinstance(act, dict):
        act = act.get("name")
    if act != "silu":
        raise HFConversionError(f"{model_type}: activation {act!r} is not supported (moeforge experts are SwiGLU)")


def unfuse_experts(hf: StateDict, prefix: str, gate: str, up: str, down: str) -> StateDict:
    """transformers 5 stores experts fused: `{prefix[:-1]}.gate_up_proj` (E, 2F, D), gate rows first, and
    `.down_proj` (E, D, F). Rewrite them as the published per-expert Linear layout
    `{prefix}{j}.{gate|up|down}.weight`; other keys pass through."""
    out: StateDict = {}
    fused = prefix.rstrip(".")
    for k, v in hf.items():
        if k.endswith(fused + ".gate_up_proj"):
            base = k[: -len("gate_up_proj")]
            f = v.shape[1] // 2
            for j in range(v.shape[0]):
                out[f"{base}{j}.{gate}.weight"] = v[j, :f]
                out[f"{base}{j}.{up}.weight"] = v[j, f:]
        elif k.endswith(fused + ".down_proj"):
            base = k[: -len("down_proj")]
            for j in range(v.shape[0]):
                out[f"{base}{j}.{down}.weight"] = v[j]
        else:
            out[k] = v
    return out


def tie_head(cfg: Any, ours: StateDict) -> None:
    """With tied embeddings HF folders usually omit `lm_head.weight`; our state dict holds it (the same tensor)."""
    if cfg.tie_embeddings:
        ours["lm_head.weight"] = ours["embed.weight"]


# Tensors an HF folder may hold that carry no information for us (recomputed rotary tables).
IGNORABLE = re.compile(r"(^|\.)rotary_emb\.inv_freq$|(^|\.)inv_freq$")


def check_consumed(hf: StateDict, model_type: str) -> None:
    """Error on HF tensors no mapping consumed: silently dropping weights would change the outputs."""
    left = sorted(k for k in hf if not IGNORABLE.search(k))
    if left:
        raise HFConversionError(f"{model_type}: {len(left)} tensors in the HF weights have no moeforge "
                                f"counterpart: {_head(left)}")
