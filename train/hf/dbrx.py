"""DBRX ↔ transformers' `DbrxForCausalLM`.

DBRX fuses q, k, v into one `Wqkv` (rows q, then k, then v; `clip_qkv` clamps the fused output, which is the
same as clamping each part) and stores each projection of all experts as one (E·F, D) matrix: `w1` (gate) and
`v1` (up) as x @ w.T per expert, `w2` (down) as h @ w, i.e. already our (F, D) `w_down_EFD` layout.
Its LayerNorms have no bias and transformers fixes their eps at 1e-5.
"""
from __future__ import annotations

from typing import Any

import torch

from train.config.model import ModelConfig
from train.hf import fields, rope, weights
from train.hf.errors import HFConversionError, require
from train.hf.fields import Field
from train.hf.weights import StateDict, Weight

MODEL_TYPE = "dbrx"
FAMILIES = ("dbrx",)
BASE_CONFIG = "dbrx"
LAYERNORM_EPS = 1e-5  # nn.LayerNorm's default, which DbrxModel uses for every norm

FIELDS = (
    Field("vocab_size", "vocab_size"),
    Field("d_model", "d_model"),
    Field("num_layers", "n_layers"),
    Field("max_seq_len", "max_seq_len"),
    Field("tie_embeddings", "tie_word_embeddings"),
    Field("init_std", "initializer_range"),
    Field("attention.num_heads", "n_heads"),
    Field("attention.num_kv_heads", "attn_config.kv_n_heads"),
    Field("attention.clip_qkv", "attn_config.clip_qkv"),
    Field("moe.num_experts", "ffn_config.moe_num_experts"),
    Field("moe.top_k", "ffn_config.moe_top_k"),
    Field("moe.expert_hidden", "ffn_config.ffn_hidden_size"),
    Field("moe.expert_balance_coef", "ffn_config.moe_loss_weight"),
)

WEIGHTS = (
    Weight("embed.weight", "transformer.wte.weight"),
    Weight("norm.weight", "transformer.norm_f.weight"),
    Weight("lm_head.weight", "lm_head.weight"),
)

LAYER_WEIGHTS = (
    Weight("{p}attn_norm.weight", "{h}norm_attn_norm.norm_1.weight"),
    Weight("{p}ffn_norm.weight", "{h}norm_attn_norm.norm_2.weight"),
    Weight("{p}attn.o_proj.weight", "{h}norm_attn_norm.attn.out_proj.weight"),
    Weight("{p}ffn.router.gate.weight", "{h}ffn.router.layer.weight"),
)
WQKV = "{h}norm_attn_norm.attn.Wqkv.weight"
EXPERTS = "{h}ffn.experts.mlp.{name}"


def check_exportable(cfg: ModelConfig) -> None:
    f, a = "dbrx", cfg.attention
    fields.check_llama_style_gqa(cfg, f)
    require(cfg.norm == "layernorm", f, f"norm={cfg.norm!r} (DBRX uses LayerNorm without bias)")
    require(cfg.norm_eps == LAYERNORM_EPS, f, f"norm_eps={cfg.norm_eps} (transformers fixes DBRX's at 1e-5)")
    require(cfg.head_dim * a.num_heads == cfg.d_model, f,
            f"head_dim {cfg.head_dim} x num_heads {a.num_heads} != d_model {cfg.d_model} (DBRX derives head_dim)")
    require(a.sliding_window is None, f, "attention.sliding_window is set (DBRX attends to the full context)")
    require(not cfg.tie_embeddings, f, "tie_embeddings=true (transformers' DBRX rejects tied embeddings)")
    fields.check_topk_softmax_routing(cfg, f)
    require(cfg.mtp_depth == 0, f, "mtp_depth > 0 (multi-token prediction exists only in DeepSeek-V3)")


def hf_config(cfg: ModelConfig) -> Any:
    from transformers import DbrxConfig

    kwargs = fields.fields_to_hf(FIELDS, cfg)
    # rope_theta goes in both places: transformers 5 reads `rope_parameters`, 4.x and the published
    # config.json use `attn_config.rope_theta`.
    kwargs["attn_config"].update(rope_theta=float(cfg.rope.theta), attn_pdrop=0.0)
    kwargs["ffn_config"].update(ffn_act_fn={"name": "silu"}, moe_jitter_eps=None, moe_normalize_expert_weights=1.0)
    kwargs.update(rope_parameters=rope.to_hf(cfg.rope), resid_pdrop=0.0, emb_pdrop=0.0,
                  architectures=["DbrxForCausalLM"])
    return DbrxConfig(**kwargs)


def model_config(hf: Any, cfg: ModelConfig) -> None:
    fields.require_silu(hf, MODEL_TYPE, "ffn_config.ffn_act_fn")
    fields.fields_from_hf(FIELDS, hf, cfg)
    a = cfg.attention
    a.kind, a.bias, a.sliding_window, a.head_dim = "gqa", False, None, cfg.d_model // a.num_heads
    cfg.norm, cfg.norm_eps = "layernorm", LAYERNORM_EPS
    cfg.rope.theta, cfg.rope.scaling = rope.from_hf(hf.rope_parameters)
    legacy_theta = getattr(hf.attn_config, "rope_theta", None)
    if legacy_theta is not None and float(legacy_theta) != cfg.rope.theta:
        # transformers 5.23 ignores attn_config.rope_theta (the published location) and uses rope_parameters;
        # we follow the published value, which is what the weights were trained with.
        cfg.rope.theta = float(legacy_theta)
    cfg.rope.interleaved = False
    cfg.dense_hidden = cfg.moe.expert_hidden
    fields.set_topk_softmax_routing(cfg)
    p = hf.ffn_config.moe_normalize_expert_weights
    if p is None:  # plain top-k softmax probabilities, not renormalised
        cfg.moe.scoring, cfg.moe.norm_topk_prob = "softmax_topk", False
    elif float(p) != 1.0:
        raise HFConversionError(f"dbrx: moe_normalize_expert_weights={p} (only 1, the sum, or null is supported)")
    cfg.mtp_depth = 0


def to_hf(cfg: ModelConfig, sd: StateDict) -> StateDict:
    out: StateDict = {}
    weights.rename_to_hf(WEIGHTS, sd, out)
    for i in range(cfg.num_layers):
        p, h = f"layers.{i}.", f"transformer.blocks.{i}."
        weights.rename_to_hf(LAYER_WEIGHTS, sd, out, p=p, h=h)
        out[WQKV.format(h=h)] = torch.cat([sd[f"{p}attn.{n}_proj.weight"] for n in "qkv"], dim=0)
        e = f"{p}ffn.experts."
        E, D, F = sd[e + "w_gate_EDF"].shape
        out[EXPERTS.format(h=h, name="w1")] = sd[e + "w_gate_EDF"].transpose(1, 2).reshape(E * F, D)
        out[EXPERTS.format(h=h, name="v1")] = sd[e + "w_up_EDF"].transpose(1, 2).reshape(E * F, D)
        out[EXPERTS.format(h=h, name="w2")] = sd[e + "w_down_EFD"].reshape(E * F, D)
    return out


def from_hf(cfg: ModelConfig, hf: StateDict) -> StateDict:
    out: StateDict = {}
    weights.rename_from_hf(WEIGHTS, hf, out)
    a, E, F, D = cfg.attention, cfg.moe.num_experts, cfg.moe.expert_hidden, cfg.d_model
    q_rows, kv_rows = a.num_heads * cfg.head_dim, a.num_kv_heads * cfg.head_dim
    for i in range(cfg.num_layers):
        p, h = f"layers.{i}.", f"transformer.blocks.{i}."
        weights.rename_from_hf(LAYER_WEIGHTS, hf, out, p=p, h=h)
        wqkv = _pop(hf, WQKV.format(h=h))
        if wqkv.shape[0] != q_rows + 2 * kv_rows:
            raise HFConversionError(f"dbrx: {WQKV.format(h=h)} has {wqkv.shape[0]} rows, expected "
                                    f"{q_rows} + 2 x {kv_rows} from the config")
        for name, w in zip("qkv", wqkv.split([q_rows, kv_rows, kv_rows], dim=0)):
            out[f"{p}attn.{name}_proj.weight"] = w
        e = f"{p}ffn.experts."
        out[e + "w_gate_EDF"] = _pop(hf, EXPERTS.format(h=h, name="w1")).reshape(E, F, D).transpose(1, 2)
        out[e + "w_up_EDF"] = _pop(hf, EXPERTS.format(h=h, name="v1")).reshape(E, F, D).transpose(1, 2)
        out[e + "w_down_EFD"] = _pop(hf, EXPERTS.format(h=h, name="w2")).reshape(E, F, D)
    weights.check_consumed(hf, MODEL_TYPE)
    return {k: v.contiguous() for k, v in out.items()}


def _pop(hf: StateDict, key: str) -> torch.Tensor:
    if key not in hf:
        raise HFConversionError(f"dbrx: missing tensor {key} in the Hugging Face weights")
    return hf.pop(key)

