"""Mixtral ↔ transformers' `MixtralForCausalLM`.

Export writes the published checkpoint layout (`block_sparse_moe.experts.{j}.w1/w2/w3`, one Linear per
expert), which every transformers version and other runtimes read; transformers 5 fuses it into
`mlp.experts.gate_up_proj` / `down_proj` on load. Import accepts both layouts.
"""
from __future__ import annotations

from typing import Any

from train.config.model import ModelConfig
from train.hf import expert_layout, fields, rope, weights
from train.hf.errors import require
from train.hf.fields import Field
from train.hf.weights import StateDict, Weight

MODEL_TYPE = "mixtral"
FAMILIES = ("mixtral",)
BASE_CONFIG = "mixtral_8x7b"  # published config whose training-only settings an import starts from

FIELDS = (
    *fields.LLAMA_STYLE_FIELDS,
    Field("attention.num_heads", "num_attention_heads"),
    Field("attention.num_kv_heads", "num_key_value_heads"),
    Field("attention.head_dim", "head_dim"),
    Field("attention.sliding_window", "sliding_window"),
    Field("moe.num_experts", "num_local_experts"),
    Field("moe.top_k", "num_experts_per_tok"),
    Field("moe.expert_hidden", "intermediate_size"),
)

# transformers' Mixtral balance loss is E * sum_i (count_i / T) * P_i, K times our expert-level term
# (E / (K T) * sum_i count_i * P_i, DeepSeek-V2's and MegaBlocks' normalisation, 1.0 at perfect balance);
# router_aux_loss_coef = ours / K keeps the same objective on both sides.

WEIGHTS = weights.LLAMA_STYLE_WEIGHTS

LAYER_WEIGHTS = (
    *weights.LLAMA_STYLE_LAYER_WEIGHTS,
    Weight("{p}ffn.router.gate.weight", "{h}block_sparse_moe.gate.weight"),
)

# Per-expert Linear names in the published layout: w1 gate, w3 up, w2 down.
EXPERT = "{h}block_sparse_moe.experts.{{j}}.{name}.weight"
EXPERT_NAMES = {"w_gate_EDF": "w1", "w_up_EDF": "w3", "w_down_EFD": "w2"}


def check_exportable(cfg: ModelConfig) -> None:
    """Everything MixtralForCausalLM cannot express is a clear error (granularity already flattened)."""
    f, m, a = "mixtral", cfg.moe, cfg.attention
    fields.check_llama_style_gqa(cfg, f)
    require(cfg.norm == "rmsnorm", f, f"norm={cfg.norm!r} (Mixtral uses rmsnorm)")
    require(a.clip_qkv is None, f, "attention.clip_qkv is set (Mixtral has no qkv clipping; DBRX does)")
    fields.check_topk_softmax_routing(cfg, f)
    require(cfg.mtp_depth == 0, f, "mtp_depth > 0 (multi-token prediction exists only in DeepSeek-V3)")


def hf_config(cfg: ModelConfig) -> Any:
    from transformers import MixtralConfig

    kwargs = fields.fields_to_hf(FIELDS, cfg)
    kwargs["router_aux_loss_coef"] = cfg.moe.expert_balance_coef / cfg.moe.num_active_routed
    kwargs.update(rope_parameters=rope.to_hf(cfg.rope), hidden_act="silu", router_jitter_noise=0.0,
                  attention_dropout=0.0, architectures=["MixtralForCausalLM"])
    return MixtralConfig(**kwargs)


def model_config(hf: Any, cfg: ModelConfig) -> None:
    """Fill `cfg` (a copy of BASE_CONFIG) in place from a loaded MixtralConfig."""
    fields.require_silu(hf, MODEL_TYPE)
    fields.fields_from_hf(FIELDS, hf, cfg)
    cfg.moe.expert_balance_coef = hf.router_aux_loss_coef * cfg.moe.top_k
    cfg.attention.kind, cfg.attention.bias, cfg.attention.clip_qkv = "gqa", False, None
    if cfg.attention.head_dim is None:
        cfg.attention.head_dim = cfg.d_model // cfg.attention.num_heads
    cfg.rope.theta, cfg.rope.scaling = rope.from_hf(hf.rope_parameters)
    cfg.rope.interleaved = False
    cfg.norm = "rmsnorm"
    cfg.dense_hidden = cfg.moe.expert_hidden  # no dense layers; keeps the published configs' convention
    fields.set_topk_softmax_routing(cfg)
    cfg.mtp_depth = 0


def to_hf(cfg: ModelConfig, sd: StateDict) -> StateDict:
    out: StateDict = {}
    weights.rename_to_hf(WEIGHTS, sd, out)
    for i in range(cfg.num_layers):
        p, h = f"layers.{i}.", f"model.layers.{i}."
        weights.rename_to_hf(LAYER_WEIGHTS, sd, out, p=p, h=h)
        for ours, name in EXPERT_NAMES.items():
            template = EXPERT.format(h=h, name=name)
            for j, w in enumerate(expert_layout.experts_to_linears(sd[f"{p}ffn.experts.{ours}"])):
                out[template.format(j=j)] = w
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)  # transformers ties it to the embedding
    return out


def from_hf(cfg: ModelConfig, hf: StateDict) -> StateDict:
    """Our state dict from HF tensors (either layout); consumed tensors are removed from `hf`."""
    hf = expert_layout.unfuse_experts(
        {k.replace(".mlp.", ".block_sparse_moe."): v for k, v in hf.items()}, "block_sparse_moe.experts.",
        gate="w1", up="w3", down="w2")
    out: StateDict = {}
    weights.rename_from_hf(WEIGHTS, hf, out)
    for i in range(cfg.num_layers):
        p, h = f"layers.{i}.", f"model.layers.{i}."
        weights.rename_from_hf(LAYER_WEIGHTS, hf, out, p=p, h=h)
        for ours, name in EXPERT_NAMES.items():
            linears = weights.pop_indexed(hf, EXPERT.format(h=h, name=name), cfg.moe.num_experts)
            out[f"{p}ffn.experts.{ours}"] = expert_layout.experts_from_linears(linears)
    weights.check_consumed(hf, MODEL_TYPE)
    weights.tie_head(cfg, out)
    return out
