"""Config translation: one table of `Field`s per family, read in both directions, and the checks and settings
several families share (what an HF class cannot represent is refused with `require`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

from train.config.routing import device_limit_groups
from train.hf.errors import HFConversionError, require


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
