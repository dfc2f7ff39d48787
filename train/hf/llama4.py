"""Llama 4 text models ↔ transformers' `Llama4ForCausalLM` (`Llama4TextConfig`, model_type `llama4_text`).

What maps: GQA with complex (adjacent-pair, `rope.interleaved`) RoPE; NoPE every `no_rope_layer_interval`-th layer
with the attention temperature there; chunked attention on the RoPE layers; MoE every
`interleave_moe_layer_step`-th layer (the last of each group) with a sigmoid top-1 router whose weight scales the
expert's input (`moe.expert_input_scaling`) and one shared expert; dense layers of width `intermediate_size_mlp`.
Not supported, a clear error: the L2 q/k norm of the 16-expert model (`use_qk_norm`, Scout), rope scaling other
than YaRN. The experts are stored fused as transformers holds them: `feed_forward.experts.gate_up_proj`
(E, D, 2F: gate columns first) and `down_proj` (E, F, D).
"""
from __future__ import annotations

from typing import Any

import torch

from train.config.model import ModelConfig
from train.config.routing import device_limit_groups
from train.hf import fields, rope, weights
from train.hf.errors import HFConversionError, require
from train.hf.fields import Field
from train.hf.weights import StateDict, Weight

MODEL_TYPE = "llama4_text"
FAMILIES = ("llama4", "llama4_text")  # ours, and what an import names it
BASE_CONFIG = "llama4_maverick"

FIELDS = (
    *fields.LLAMA_STYLE_FIELDS,
    Field("attention.num_heads", "num_attention_heads"),
    Field("attention.num_kv_heads", "num_key_value_heads"),
    Field("attention.head_dim", "head_dim"),
    Field("attention.nope_layer_interval", "no_rope_layer_interval"),
    Field("attention.chunk_size", "attention_chunk_size"),
    Field("moe.num_experts", "num_local_experts"),
    Field("moe.top_k", "num_experts_per_tok"),
    Field("moe.expert_hidden", "intermediate_size"),
    Field("moe.layer_freq", "interleave_moe_layer_step"),
    Field("dense_hidden", "intermediate_size_mlp"),
)

WEIGHTS = weights.LLAMA_STYLE_WEIGHTS

_PROJ = {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"}
LAYER_WEIGHTS = (
    *weights.LLAMA_STYLE_LAYER_WEIGHTS,
    Weight("{p}ffn.router.gate.weight", "{h}feed_forward.router.weight"),
    Weight("{p}ffn.experts.w_down_EFD", "{h}feed_forward.experts.down_proj"),
    *(Weight(f"{{p}}ffn.shared.{o}.weight", f"{{h}}feed_forward.shared_expert.{hf}.weight") for o, hf in _PROJ.items()),
    *(Weight(f"{{p}}ffn.{o}.weight", f"{{h}}feed_forward.{hf}.weight") for o, hf in _PROJ.items()),  # dense layers
)
GATE_UP = "{h}feed_forward.experts.gate_up_proj"


def check_exportable(cfg: ModelConfig) -> None:
    """Everything Llama4ForCausalLM cannot express is a clear error (granularity already flattened)."""
    f, m, a = "llama4", cfg.moe, cfg.attention
    require(a.kind == "gqa", f, f"attention.kind={a.kind!r} (only gqa)")
    require(not a.bias and not a.qkv_bias, f, "attention biases (not exported)")
    require(a.qk_norm is None and a.clip_qkv is None and a.sliding_window is None and a.logit_softcap is None, f,
            "attention.qk_norm / clip_qkv / sliding_window / logit_softcap is set (Llama 4 has none of them)")
    require(a.nope_layer_interval is not None and a.chunk_size is not None, f,
            "attention.nope_layer_interval and chunk_size must be set (the HF class always has NoPE layers and "
            "chunked RoPE layers)")
    require(cfg.rope.interleaved, f, "rope.interleaved=false (Llama 4 rotates adjacent pairs)")
    require(cfg.norm == "rmsnorm" and not cfg.post_sublayer_norm, f, "norms other than Llama's pre-norm RMSNorm")
    require(cfg.embedding_multiplier == 1.0 and cfg.output_multiplier == 1.0, f, "embedding/output multipliers")
    require(m.scoring == "sigmoid" and not m.norm_topk_prob and m.top_k == 1 and m.expert_input_scaling, f,
            "routing other than sigmoid top-1 scaling the expert input (moe.scoring=sigmoid, top_k=1, "
            "expert_input_scaling=true)")
    require(m.num_shared_experts == 1 and not m.shared_expert_gate, f, "not exactly one ungated shared expert")
    require(m.first_k_dense == 0 and m.layer_offset == m.layer_freq - 1, f,
            "MoE layers other than the last of each group of moe.layer_freq (interleave_moe_layer_step)")
    require(m.num_groups == 1 and device_limit_groups(m) is None and m.routed_scaling_factor == 1.0
            and not m.uses_expert_bias and m.capacity_factor is None, f,
            "group/device-limited routing, routed scaling, expert bias or a capacity factor")
    require(cfg.mtp_depth == 0, f, "mtp_depth > 0")


def hf_config(cfg: ModelConfig) -> Any:
    from transformers import Llama4TextConfig

    a, m = cfg.attention, cfg.moe
    kwargs = fields.fields_to_hf(FIELDS, cfg)
    tuning = a.temperature_floor_scale is not None
    kwargs.update(rope_parameters=rope.to_hf(cfg.rope), hidden_act="silu", attention_dropout=0.0,
                  attention_bias=False, use_qk_norm=False, attn_temperature_tuning=tuning,
                  floor_scale=int(a.temperature_floor_scale) if tuning else 8192, attn_scale=a.temperature_scale,
                  router_aux_loss_coef=m.expert_balance_coef, router_jitter_noise=0.0,
                  architectures=["Llama4ForCausalLM"])
    return Llama4TextConfig(**kwargs)


def model_config(hf: Any, cfg: ModelConfig) -> None:
    """Fill `cfg` (a copy of BASE_CONFIG) in place from a loaded Llama4TextConfig."""
    fields.require_silu(hf, MODEL_TYPE)
    if getattr(hf, "use_qk_norm", False):
        raise HFConversionError("llama4_text: use_qk_norm=true (the 16-expert model's L2 q/k norm) is not supported")
    if getattr(hf, "attention_bias", False):
        raise HFConversionError("llama4_text: attention_bias=true is not supported")
    fields.fields_from_hf(FIELDS, hf, cfg)
    step = cfg.moe.layer_freq
    if list(hf.moe_layers) != list(range(step - 1, hf.num_hidden_layers, step)):
        raise HFConversionError(f"llama4_text: moe_layers={hf.moe_layers} are not every {step}th layer")
    expected_nope = [int((i + 1) % hf.no_rope_layer_interval != 0) for i in range(hf.num_hidden_layers)]
    if list(hf.no_rope_layers) != expected_nope:
        raise HFConversionError("llama4_text: no_rope_layers differ from every no_rope_layer_interval-th layer")
    a, m = cfg.attention, cfg.moe
    a.kind, a.bias, a.qkv_bias, a.qk_norm, a.clip_qkv, a.sliding_window, a.logit_softcap = (
        "gqa", False, False, None, None, None, None)
    a.temperature_floor_scale = float(hf.floor_scale) if hf.attn_temperature_tuning else None
    a.temperature_scale = float(hf.attn_scale)
    m.layer_offset, m.first_k_dense, m.num_shared_experts, m.shared_expert_gate = step - 1, 0, 1, False
    m.scoring, m.norm_topk_prob, m.expert_input_scaling, m.routed_scaling_factor = "sigmoid", False, True, 1.0
    m.granularity, m.num_groups, m.topk_groups, m.bias_update_rate, m.capacity_factor = 1, 1, 1, 0.0, None
    m.expert_balance_coef = hf.router_aux_loss_coef
    cfg.rope.theta, cfg.rope.scaling = rope.from_hf(hf.rope_parameters)
    cfg.rope.interleaved, cfg.norm, cfg.post_sublayer_norm, cfg.mtp_depth = True, "rmsnorm", False, 0
    cfg.embedding_multiplier = cfg.output_multiplier = 1.0


def to_hf(cfg: ModelConfig, sd: StateDict) -> StateDict:
    out: StateDict = {}
    weights.rename_to_hf(WEIGHTS, sd, out)
    for i in range(cfg.num_layers):
        p, h = f"layers.{i}.", f"model.layers.{i}."
        weights.rename_to_hf(LAYER_WEIGHTS, sd, out, p=p, h=h)
        if cfg.is_moe_layer(i):
            gate, up = sd[f"{p}ffn.experts.w_gate_EDF"], sd[f"{p}ffn.experts.w_up_EDF"]
            out[GATE_UP.format(h=h)] = torch.cat([gate, up], dim=-1)
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def from_hf(cfg: ModelConfig, hf: StateDict) -> StateDict:
    """Our state dict from HF tensors; consumed tensors are removed from `hf`."""
    out: StateDict = {}
    weights.rename_from_hf(WEIGHTS, hf, out)
    for i in range(cfg.num_layers):
        p, h = f"layers.{i}.", f"model.layers.{i}."
        weights.rename_from_hf(LAYER_WEIGHTS, hf, out, p=p, h=h)
        if cfg.is_moe_layer(i):
            gate_up = hf.pop(GATE_UP.format(h=h))
            f = gate_up.shape[-1] // 2
            out[f"{p}ffn.experts.w_gate_EDF"] = gate_up[..., :f].contiguous()
            out[f"{p}ffn.experts.w_up_EDF"] = gate_up[..., f:].contiguous()
    weights.check_consumed(hf, MODEL_TYPE)
    weights.tie_head(cfg, out)
    return out
