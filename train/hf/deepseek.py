"""DeepSeek-V2 / V3 ↔ transformers' `DeepseekV2ForCausalLM` / `DeepseekV3ForCausalLM`.

Our MLA already uses DeepSeek's parameter names, so attention maps 1:1. Export writes the published
per-expert layout (`mlp.experts.{j}.gate_proj/up_proj/down_proj`), which transformers 5 fuses on load;
import accepts that and the fused `gate_up_proj` / `down_proj` layout. V3's multi-token-prediction module k
is layer `num_hidden_layers + k - 1` of DeepSeek's checkpoint (`enorm`, `hnorm`, `eh_proj`, a decoder layer,
`shared_head.norm`, plus copies of the shared `embed_tokens` and `shared_head.head`); transformers itself
does not run it.

What transformers computes differs from DeepSeek's reference code in two places the checks below enforce:
DeepseekV2's router ignores `norm_topk_prob` and every layer from `first_k_dense_replace` on is MoE (no
`moe_layer_freq`).

Device-limited routing (`moe.device_limit` = M below `moe.routing_groups` = G) takes the place of the node groups
in our router; V2 exports it as what it is, `group_limited_greedy` with `n_group` = G and `topk_group` = M (a group
scores as its best expert in both). V3 scores a group by its top-2 sum, so a V3 model with an active device limit
is refused.
"""
from __future__ import annotations

from typing import Any

import torch

from train.config.model import ModelConfig
from train.config.routing import device_limit_groups
from train.hf import expert_layout, fields, rope, weights
from train.hf.errors import HFConversionError, require
from train.hf.fields import Field
from train.hf.weights import StateDict, Weight

MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
FAMILIES = ("deepseek_v2", "deepseek_v3")
BASE_CONFIG = {"deepseek_v2": "deepseek_v2", "deepseek_v3": "deepseek_v3"}
ARCHITECTURES = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}

_none_is_1 = dict(to_hf=lambda v: v, from_hf=lambda v: 1 if v is None else v)
FIELDS = (
    *fields.LLAMA_STYLE_FIELDS,
    Field("dense_hidden", "intermediate_size"),
    Field("attention.num_heads", "num_attention_heads"),
    Field("attention.q_lora_rank", "q_lora_rank"),
    Field("attention.kv_lora_rank", "kv_lora_rank"),
    Field("attention.qk_nope_head_dim", "qk_nope_head_dim"),
    Field("attention.qk_rope_head_dim", "qk_rope_head_dim"),
    Field("attention.v_head_dim", "v_head_dim"),
    Field("attention.bias", "attention_bias"),
    Field("moe.num_experts", "n_routed_experts"),
    Field("moe.top_k", "num_experts_per_tok"),
    Field("moe.expert_hidden", "moe_intermediate_size"),
    Field("moe.num_shared_experts", "n_shared_experts"),
    Field("moe.routed_scaling_factor", "routed_scaling_factor"),
    Field("moe.norm_topk_prob", "norm_topk_prob", from_hf=bool),
    Field("moe.num_groups", "n_group", **_none_is_1),
    Field("moe.topk_groups", "topk_group", **_none_is_1),
    Field("moe.first_k_dense", "first_k_dense_replace"),
)
V3_FIELDS = (
    Field("mtp_depth", "num_nextn_predict_layers"),
    Field("rope.interleaved", "rope_interleave", from_hf=bool),
)

WEIGHTS = weights.LLAMA_STYLE_WEIGHTS
ATTN_WEIGHTS = (
    *weights.LLAMA_STYLE_NORM_WEIGHTS,
    *(Weight(f"{{p}}attn.{n}.{t}", f"{{h}}self_attn.{n}.{t}")
      for n in ("q_proj", "q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm",
                "kv_b_proj", "o_proj")
      for t in ("weight", "bias")),
)
DENSE_WEIGHTS = tuple(Weight(f"{{p}}ffn.{ours}.weight", f"{{h}}mlp.{hf}.weight")
                      for ours, hf in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")))
MOE_WEIGHTS = (
    Weight("{p}ffn.router.gate.weight", "{h}mlp.gate.weight"),
    Weight("{p}ffn.router.expert_bias_E", "{h}mlp.gate.e_score_correction_bias"),
    *(Weight(f"{{p}}ffn.shared.{ours}.weight", f"{{h}}mlp.shared_experts.{hf}.weight")
      for ours, hf in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj"))),
)
EXPERT = "{h}mlp.experts.{{j}}.{name}.weight"
EXPERT_NAMES = {"w_gate_EDF": "gate_proj", "w_up_EDF": "up_proj", "w_down_EFD": "down_proj"}
MTP_WEIGHTS = (
    Weight("{p}enorm.weight", "{h}enorm.weight"),
    Weight("{p}hnorm.weight", "{h}hnorm.weight"),
    Weight("{p}eh_proj.weight", "{h}eh_proj.weight"),
    Weight("{p}norm.weight", "{h}shared_head.norm.weight"),
)
# Copies of the shared embedding and head that DeepSeek's checkpoints keep in every MTP layer.
MTP_SHARED = {"embed.weight": "{h}embed_tokens.weight", "lm_head.weight": "{h}shared_head.head.weight"}


def check_exportable(cfg: ModelConfig) -> None:
    f, m, a = cfg.family, cfg.moe, cfg.attention
    v3 = f == "deepseek_v3"
    require(a.kind == "mla", f, f"attention.kind={a.kind!r} (the HF DeepSeek classes use MLA)")
    require(cfg.norm == "rmsnorm", f, f"norm={cfg.norm!r} (DeepSeek uses rmsnorm)")
    require(m.layer_freq == 1, f, "moe.layer_freq != 1 (transformers makes every layer from "
                                  "first_k_dense_replace on MoE and ignores moe_layer_freq)")
    require(m.num_shared_experts >= 1, f, "moe.num_shared_experts == 0 (the HF class always has shared experts)")
    require(m.capacity_factor is None, f, "moe.capacity_factor is set (HF inference is dropless)")
    require(m.num_experts % m.num_groups == 0, f, "moe.num_groups does not divide the routed experts")
    if v3:
        require(device_limit_groups(m) is None, f, "moe.device_limit below moe.routing_groups (DeepseekV3 scores a "
                                                   "group by its top-2 sum, device-limited routing by its best "
                                                   "expert): export as family deepseek_v2 or drop the limit")
        require(m.scoring == "sigmoid", f, f"moe.scoring={m.scoring!r} (DeepseekV3 routes with sigmoid)")
        require(m.num_groups == 1 or m.group_score == "top2_sum", f,
                "moe.group_score must be top2_sum with groups (DeepseekV3 scores a group by its top-2 sum)")
        require(m.num_experts // m.num_groups >= 2, f, "fewer than 2 experts per group (top2_sum needs 2)")
    else:
        require(m.scoring == "softmax_topk", f, f"moe.scoring={m.scoring!r} (DeepseekV2 routes with softmax "
                                                "then top-k); export a sigmoid router as family deepseek_v3")
        require(not m.norm_topk_prob or m.top_k == 1, f,
                "moe.norm_topk_prob=true (transformers' DeepseekV2 router never renormalises)")
        require(m.num_groups == 1 or m.group_score == "max", f,
                "moe.group_score must be max with groups (DeepseekV2's group_limited_greedy)")
        require(not m.uses_expert_bias, f, "moe.bias_update_rate > 0 (the expert bias is DeepSeek-V3's)")
        require(cfg.rope.interleaved, f, "rope.interleaved=false (DeepseekV2 rotates adjacent channel pairs)")
        require(cfg.mtp_depth == 0, f, "mtp_depth > 0 (multi-token prediction is DeepSeek-V3's)")


def hf_config(cfg: ModelConfig) -> Any:
    from transformers import DeepseekV2Config, DeepseekV3Config

    v3 = cfg.family == "deepseek_v3"
    m = cfg.moe
    kwargs = fields.fields_to_hf(FIELDS + (V3_FIELDS if v3 else ()), cfg)
    limited = device_limit_groups(m)  # V2 only (check_exportable): it replaces the node groups
    if limited is not None:
        kwargs.update(n_group=limited[0], topk_group=limited[1])
    kwargs.update(
        num_key_value_heads=cfg.attention.num_heads,  # MLA expands keys/values per head
        rope_parameters=rope.to_hf(cfg.rope), hidden_act="silu", attention_dropout=0.0,
        moe_layer_freq=1, architectures=[ARCHITECTURES[cfg.family]],
        # Read by DeepSeek's reference code and other runtimes; transformers infers them from the class.
        scoring_func="sigmoid" if v3 else "softmax",
        topk_method="noaux_tc" if v3 else ("group_limited_greedy" if kwargs["n_group"] > 1 else "greedy"),
    )
    return (DeepseekV3Config if v3 else DeepseekV2Config)(**kwargs)


def model_config(hf: Any, cfg: ModelConfig) -> None:
    v3 = hf.model_type == "deepseek_v3"
    fields.require_silu(hf, hf.model_type)
    fields.fields_from_hf(FIELDS + (V3_FIELDS if v3 else ()), hf, cfg)
    a, m = cfg.attention, cfg.moe
    a.kind, a.num_kv_heads, a.head_dim, a.sliding_window, a.clip_qkv = "mla", a.num_heads, None, None, None
    if getattr(hf, "num_key_value_heads", a.num_heads) != a.num_heads:
        raise HFConversionError(f"{hf.model_type}: num_key_value_heads != num_attention_heads is not MLA")
    cfg.norm = "rmsnorm"
    cfg.rope.theta, cfg.rope.scaling = rope.from_hf(hf.rope_parameters)
    m.granularity, m.layer_freq, m.capacity_factor = 1, 1, None
    scoring = getattr(hf, "scoring_func", None)
    if v3:
        if scoring not in (None, "sigmoid"):
            raise HFConversionError(f"deepseek_v3: scoring_func={scoring!r} (transformers' class uses sigmoid)")
        m.scoring, m.group_score = "sigmoid", "top2_sum"
        if m.bias_update_rate <= 0:
            m.bias_update_rate = 0.001  # V3's gamma; the selection bias buffer exists only when it is > 0
    else:
        if scoring not in (None, "softmax"):
            raise HFConversionError(f"deepseek_v2: scoring_func={scoring!r} (transformers' class uses softmax)")
        m.scoring, m.group_score, m.bias_update_rate = "softmax_topk", "max", 0.0
        m.norm_topk_prob = False  # transformers' DeepseekV2 router never renormalises, whatever the config says
        cfg.rope.interleaved, cfg.mtp_depth = True, 0
        method = getattr(hf, "topk_method", "greedy")
        if method == "greedy":
            m.num_groups, m.topk_groups = 1, 1
        elif method != "group_limited_greedy":
            raise HFConversionError(f"deepseek_v2: topk_method={method!r} (greedy and group_limited_greedy are)")


def to_hf(cfg: ModelConfig, sd: StateDict) -> StateDict:
    out: StateDict = {}
    weights.rename_to_hf(WEIGHTS, sd, out)
    for i in range(cfg.num_layers):
        _layer_to_hf(cfg, sd, out, f"layers.{i}.", f"model.layers.{i}.", i)
    for k in range(cfg.mtp_depth):
        p, h = f"mtp.{k}.", f"model.layers.{cfg.num_layers + k}."
        weights.rename_to_hf(MTP_WEIGHTS, sd, out, p=p, h=h)
        for ours, hf in MTP_SHARED.items():
            out[hf.format(h=h)] = sd[ours]
        _layer_to_hf(cfg, sd, out, p + "block.", h, cfg.num_layers + k)
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def _layer_to_hf(cfg: ModelConfig, sd: StateDict, out: StateDict, p: str, h: str, layer_idx: int) -> None:
    weights.rename_to_hf(ATTN_WEIGHTS, sd, out, p=p, h=h)
    if not cfg.is_moe_layer(layer_idx):
        weights.rename_to_hf(DENSE_WEIGHTS, sd, out, p=p, h=h)
        return
    weights.rename_to_hf(MOE_WEIGHTS, sd, out, p=p, h=h)
    bias_key = f"{h}mlp.gate.e_score_correction_bias"
    if cfg.family == "deepseek_v3" and bias_key not in out:  # V3 always has the buffer; ours only when trained
        out[bias_key] = torch.zeros(cfg.moe.num_experts, dtype=torch.float32)
    for ours, name in EXPERT_NAMES.items():
        template = EXPERT.format(h=h, name=name)
        for j, w in enumerate(expert_layout.experts_to_linears(sd[f"{p}ffn.experts.{ours}"])):
            out[template.format(j=j)] = w


def from_hf(cfg: ModelConfig, hf: StateDict) -> StateDict:
    """Our state dict from HF tensors. MTP layers present in the weights are mapped when cfg.mtp_depth
    covers them (see `mtp_layers_in`); consumed tensors are removed from `hf`."""
    hf = expert_layout.unfuse_experts(hf, "mlp.experts.", gate="gate_proj", up="up_proj", down="down_proj")
    out: StateDict = {}
    weights.rename_from_hf(WEIGHTS, hf, out)
    for i in range(cfg.num_layers):
        _layer_from_hf(cfg, hf, out, f"layers.{i}.", f"model.layers.{i}.", i)
    for k in range(cfg.mtp_depth):
        p, h = f"mtp.{k}.", f"model.layers.{cfg.num_layers + k}."
        weights.rename_from_hf(MTP_WEIGHTS, hf, out, p=p, h=h)
        for hf_name in MTP_SHARED.values():  # shared with the main model: ours has one copy
            hf.pop(hf_name.format(h=h), None)
        _layer_from_hf(cfg, hf, out, p + "block.", h, cfg.num_layers + k)
    weights.check_consumed(hf, cfg.family)
    weights.tie_head(cfg, out)
    return out


def _layer_from_hf(cfg: ModelConfig, hf: StateDict, out: StateDict, p: str, h: str, layer_idx: int) -> None:
    weights.rename_from_hf(ATTN_WEIGHTS, hf, out, p=p, h=h)
    if not cfg.is_moe_layer(layer_idx):
        weights.rename_from_hf(DENSE_WEIGHTS, hf, out, p=p, h=h)
        return
    bias_key = f"{h}mlp.gate.e_score_correction_bias"
    if not cfg.moe.uses_expert_bias and bias_key in hf:
        if torch.count_nonzero(hf[bias_key]):
            raise HFConversionError(f"{bias_key} is nonzero but the imported config has no expert bias")
        hf.pop(bias_key)
    weights.rename_from_hf(MOE_WEIGHTS, hf, out, p=p, h=h)
    if cfg.moe.uses_expert_bias:
        bias = out.get(f"{p}ffn.router.expert_bias_E", torch.zeros(cfg.moe.num_experts))
        out[f"{p}ffn.router.expert_bias_E"] = bias.float()
    for ours, name in EXPERT_NAMES.items():
        linears = weights.pop_indexed(hf, EXPERT.format(h=h, name=name), cfg.moe.num_experts)
        out[f"{p}ffn.experts.{ours}"] = expert_layout.experts_from_linears(linears)


def mtp_layers_in(hf: StateDict, num_layers: int) -> int:
    """How many consecutive MTP layers (indices num_layers, num_layers + 1, ...) the HF weights hold."""
    present = {weights.layer_index(k, "model.layers.") for k in hf}
    k = 0
    while num_layers + k in present:
        k += 1
    return k
