"""Weight names: one table of 1:1 `Weight` renames per family, read in both directions, and the checks that
every tensor was mapped with the expected shape. Transforms a table cannot say live in the family modules and
`expert_layout.py`."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional

import torch

from train.hf.errors import HFConversionError, list_keys

StateDict = Dict[str, torch.Tensor]


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


def pop_indexed(hf: StateDict, template: str, count: int) -> List[torch.Tensor]:
    """`template.format(j=j)` for j < count, removed from `hf`; a clear error when one is missing."""
    out = []
    for j in range(count):
        key = template.format(j=j)
        if key not in hf:
            raise HFConversionError(f"missing tensor {key} in the Hugging Face weights")
        out.append(hf.pop(key))
    return out


def layer_index(key: str, prefix: str) -> Optional[int]:
    """The layer number of `prefix{N}.` keys, else None."""
    m = re.match(re.escape(prefix) + r"(\d+)\.", key)
    return int(m.group(1)) if m else None


def check_shapes(expected: StateDict, got: StateDict, where: str) -> None:
    """Every expected key present with the same shape, and no unexpected keys; else a clear error."""
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    bad = sorted(k for k in set(expected) & set(got) if tuple(expected[k].shape) != tuple(got[k].shape))
    problems = []
    if missing:
        problems.append(f"missing {list_keys(missing)}")
    if extra:
        problems.append(f"unexpected {list_keys(extra)}")
    if bad:
        problems.append("shape mismatch " + ", ".join(
            f"{k}: expected {tuple(expected[k].shape)}, got {tuple(got[k].shape)}" for k in bad[:5]))
    if problems:
        raise HFConversionError(f"{where}: " + "; ".join(problems))


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
                                f"counterpart: {list_keys(left)}")
