"""Qwen2-MoE, Qwen3-MoE and OLMoE ↔ transformers' `Qwen2MoeForCausalLM`, `Qwen3MoeForCausalLM`, `OlmoeForCausalLM`.

The three share one layout: Llama-style attention (`self_attn.{q,k,v,o}_proj`), a softmax router
`mlp.gate.weight` whose top-k probabilities are renormalised or not (`norm_topk_prob`), and SwiGLU experts
`mlp.experts.{j}.{gate,up,down}_proj`. Export writes that per-expert layout, which transformers 5 fuses on load;
import accepts both. What differs, each family checked below:
- Qwen2-MoE: biases on q/k/v (`qkv_bias`), one shared expert behind a sigmoid gate (`mlp.shared_expert`,
  `mlp.shared_expert_gate`), MoE on layers (i + 1) % decoder_sparse_step == 0 outside `mlp_only_layers`;
- Qwen3-MoE: per-head q/k RMSNorm (`qk_norm: head`), no shared expert, the same layer placement;
- OLMoE: q/k RMSNorm over the whole projection (`qk_norm: full`), every layer MoE.
"""
from __future__ import annotations

from typing import Any

from train.config.model import ModelConfig
from train.config.routing import device_limit_groups
from train.hf import expert_layout, fields, rope, weights
from train.hf.errors import HFConversionError, require
from train.hf.fields import Field
from train.hf.weights import StateDict, Weight

FAMILIES = ("qwen2_moe", "qwen3_moe", "olmoe")
BASE_CONFIG = {"qwen2_moe": "qwen15_moe_a27b", "qwen3_moe": "qwen3_30b_a3b", "olmoe": "olmoe_1b_7b"}
ARCHITECTURES = {"qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                 "olmoe": "OlmoeForCausalLM"}
QK_NORM = {"qwen2_moe": None, "qwen3_moe": "head", "olmoe": "full"}

FIELDS = (
    *fields.LLAMA_STYLE_FIELDS,
    Field("attention.num_heads", "num_attention_heads"),
    Field("attention.num_kv_heads", "num_key_value_heads"),
    Field("moe.num_experts", "num_experts"),
    Field("moe.top_k", "num_experts_per_tok"),
    Field("moe.expert_hidden", "moe_intermediate_size"),
    Field("moe.norm_topk_prob", "norm_topk_prob"),
)
# OLMoE calls the expert width intermediate_size and has no dense layers.
OLMOE_FIELDS = tuple(Field(f.ours, "intermediate_size") if f.ours == "moe.expert_hidden" else f for f in FIELDS)

WEIGHTS = weights.LLAMA_STYLE_WEIGHTS

_PROJ = {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"}
LAYER_WEIGHTS = (
    *weights.LLAMA_STYLE_NORM_WEIGHTS,
    *(Weight(f"{{p}}attn.{n}_proj.{t}", f"{{h}}self_attn.{n}_proj.{t}") for n in "qkvo" for t in ("weight", "bias")),
    Weight("{p}attn.q_norm.weight", "{h}self_attn.q_norm.weight"),
    Weight("{p}attn.k_norm.weight", "{h}self_attn.k_norm.weight"),
    Weight("{p}ffn.router.gate.weight", "{h}mlp.gate.weight"),
    Weight("{p}ffn.shared_gate.weight", "{h}mlp.shared_expert_gate.weight"),
    *(Weight(f"{{p}}ffn.shared.{ours}.weight", f"{{h}}mlp.shared_expert.{hf}.weight") for ours, hf in _PROJ.items()),
    *(Weight(f"{{p}}ffn.{ours}.weight", f"{{h}}mlp.{hf}.weight") for ours, hf in _PROJ.items()),  # dense layers
)

EXPERT = "{h}mlp.experts.{{j}}.{name}.weight"
EXPERT_NAMES = {"w_gate_EDF": "gate_proj", "w_up_EDF": "up_proj", "w_down_EFD": "down_proj"}


def _moe_layers(cfg: ModelConfig) -> tuple[int, list[int]]:
    """(decoder_sparse_step, mlp_only_layers) stating our placement, or an error when they cannot."""
    m = cfg.moe
    step = m.layer_freq
    require(m.layer_offset == step - 1, cfg.family, f"moe.layer_offset={m.layer_offset} with layer_freq={step} "
            "(the HF class makes layer i MoE when (i + 1) % decoder_sparse_step == 0: offset layer_freq - 1)")
    only = [i for i in range(m.first_k_dense) if (i + 1) % step == 0]
    return step, only


def check_exportable(cfg: ModelConfig) -> None:
    """Everything the family's HF class cannot express is a clear error (granularity already flattened)."""
    f, m, a = cfg.family, cfg.moe, cfg.attention
    require(a.kind == "gqa", f, f"attention.kind={a.kind!r} (only gqa)")
    require(not a.bias, f, "attention.bias=true (no output-projection bias in the HF class)")
    require(a.qkv_bias == (f == "qwen2_moe"), f, f"attention.qkv_bias={a.qkv_bias} (Qwen2-MoE always has q/k/v "
                                               "biases, Qwen3-MoE and OLMoE never)")
    require(a.qk_norm == QK_NORM[f], f, f"attention.qk_norm={a.qk_norm!r} (the HF class has {QK_NORM[f]!r})")
    require(a.clip_qkv is None, f, "attention.clip_qkv is set (not exported: OLMoE clips after its q/k norm)")
    require(a.sliding_window is None, f, "attention.sliding_window is set (not exported)")
    require(not cfg.rope.interleaved, f, "rope.interleaved=true (the HF class rotates the two halves of each head)")
    require(cfg.norm == "rmsnorm", f, f"norm={cfg.norm!r} (the HF class uses rmsnorm)")
    require(m.scoring == "softmax_topk" or (m.scoring == "topk_softmax" and m.norm_topk_prob), f,
            f"moe.scoring={m.scoring!r} (the HF router takes the top-k of a softmax over all experts)")
    if f == "qwen2_moe":
        require(m.num_shared_experts > 0 and m.shared_expert_gate, f,
                "no gated shared expert (Qwen2-MoE always has one: moe.num_shared_experts > 0, shared_expert_gate)")
    else:
        require(m.num_shared_experts == 0, f, "moe.num_shared_experts > 0 (the HF class has no shared expert)")
    if f == "olmoe":
        require(m.first_k_dense == 0 and m.layer_freq == 1, f, "dense layers (every OLMoE layer is MoE)")
        require(a.head_dim is None or a.head_dim * a.num_heads == cfg.d_model, f,
                "attention.head_dim * num_heads != d_model (OLMoE's head size is hidden_size / heads)")
    else:
        _moe_layers(cfg)
    require(m.num_groups == 1, f, "moe.num_groups > 1 (group-limited routing is DeepSeek's)")
    require(device_limit_groups(m) is None, f, "moe.device_limit below moe.routing_groups (DeepSeek-V2's)")
    require(m.routed_scaling_factor == 1.0, f, "moe.routed_scaling_factor != 1")
    require(not m.uses_expert_bias, f, "moe.bias_update_rate > 0 (expert selection bias is DeepSeek-V3's)")
    require(m.capacity_factor is None, f, "moe.capacity_factor is set (HF inference is dropless)")
    require(cfg.mtp_depth == 0, f, "mtp_depth > 0 (multi-token prediction exists only in DeepSeek-V3)")


def hf_config(cfg: ModelConfig) -> Any:
    import transformers

    f, m = cfg.family, cfg.moe
    kwargs = fields.fields_to_hf(OLMOE_FIELDS if f == "olmoe" else FIELDS, cfg)
    kwargs.update(rope_parameters=rope.to_hf(cfg.rope), hidden_act="silu", attention_dropout=0.0,
                  router_aux_loss_coef=m.expert_balance_coef / m.num_active_routed,
                  architectures=[ARCHITECTURES[f]])
    if f == "olmoe":
        return transformers.OlmoeConfig(**kwargs, attention_bias=False, clip_qkv=None)
    step, only = _moe_layers(cfg)
    kwargs.update(intermediate_size=cfg.dense_hidden, decoder_sparse_step=step, mlp_only_layers=only,
                  head_dim=cfg.head_dim, use_sliding_window=False)
    if f == "qwen2_moe":
        return transformers.Qwen2MoeConfig(**kwargs, shared_expert_intermediate_size=m.shared_hidden, qkv_bias=True)
    return transformers.Qwen3MoeConfig(**kwargs, attention_bias=False)


def model_config(hf: Any, cfg: ModelConfig) -> None:
    """Fill `cfg` (a copy of the family's BASE_CONFIG) in place from a loaded HF config."""
    f = hf.model_type
    fields.require_silu(hf, f)
    fields.fields_from_hf(OLMOE_FIELDS if f == "olmoe" else FIELDS, hf, cfg)
    m, a = cfg.moe, cfg.attention
    m.expert_balance_coef = hf.router_aux_loss_coef * m.top_k
    m.scoring, m.routed_scaling_factor, m.granularity = "softmax_topk", 1.0, 1
    m.num_groups, m.topk_groups, m.bias_update_rate, m.capacity_factor = 1, 1, 0.0, None
    a.kind, a.bias, a.clip_qkv, a.sliding_window = "gqa", False, None, None
    a.qk_norm, a.qkv_bias = QK_NORM[f], f == "qwen2_moe"
    a.head_dim = getattr(hf, "head_dim", None) or cfg.d_model // a.num_heads
    cfg.rope.theta, cfg.rope.scaling = rope.from_hf(hf.rope_parameters)
    cfg.rope.interleaved, cfg.norm, cfg.mtp_depth = False, "rmsnorm", 0
    if f == "olmoe":
        if getattr(hf, "clip_qkv", None) is not None:
            raise HFConversionError("olmoe: clip_qkv is set (moeforge clips before the q/k norm, OLMoE after)")
        if getattr(hf, "attention_bias", False):
            raise HFConversionError("olmoe: attention_bias=true is not supported")
        m.first_k_dense, m.layer_freq, m.layer_offset, m.num_shared_experts = 0, 1, 0, 0
        cfg.dense_hidden = m.expert_hidden  # no dense layers; keeps the published configs' convention
        return
    if f == "qwen3_moe" and getattr(hf, "attention_bias", False):
        raise HFConversionError("qwen3_moe: attention_bias=true is not supported")
    step, only = hf.decoder_sparse_step, sorted(hf.mlp_only_layers)
    m.layer_freq, m.layer_offset = step, step - 1
    m.first_k_dense = only[-1] + 1 if only else 0
    hf_moe = [i for i in range(hf.num_hidden_layers) if i not in only and (i + 1) % step == 0]
    if hf_moe != [i for i in range(hf.num_hidden_layers) if cfg.is_moe_layer(i)]:
        raise HFConversionError(f"{f}: mlp_only_layers={only} do not precede every MoE layer (moeforge places "
                                "dense layers with first_k_dense and layer_freq only)")
    cfg.dense_hidden = hf.intermediate_size
    if f == "qwen2_moe":
        shared = hf.shared_expert_intermediate_size
        if shared % m.expert_hidden:
            raise HFConversionError(f"qwen2_moe: shared_expert_intermediate_size {shared} is not a multiple of "
                                    f"moe_intermediate_size {m.expert_hidden} (moeforge's shared width)")
        m.num_shared_experts, m.shared_expert_gate = shared // m.expert_hidden, True
    else:
        m.num_shared_experts, m.shared_expert_gate = 0, False


def to_hf(cfg: ModelConfig, sd: StateDict) -> StateDict:
    out: StateDict = {}
    weights.rename_to_hf(WEIGHTS, sd, out)
    for i in range(cfg.num_layers):
        p, h = f"layers.{i}.", f"model.layers.{i}."
        weights.rename_to_hf(LAYER_WEIGHTS, sd, out, p=p, h=h)
        if not cfg.is_moe_layer(i):
            continue
        for ours, name in EXPERT_NAMES.items():
            template = EXPERT.format(h=h, name=name)
            for j, w in enumerate(expert_layout.experts_to_linears(sd[f"{p}ffn.experts.{ours}"])):
                out[template.format(j=j)] = w
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)  # transformers ties it to the embedding
    return out


def from_hf(cfg: ModelConfig, hf: StateDict) -> StateDict:
    """Our state dict from HF tensors (either expert layout); consumed tensors are removed from `hf`."""
    hf = expert_layout.unfuse_experts(hf, "mlp.experts.", gate="gate_proj", up="up_proj", down="down_proj")
    out: StateDict = {}
    weights.rename_from_hf(WEIGHTS, hf, out)
    for i in range(cfg.num_layers):
        p, h = f"layers.{i}.", f"model.layers.{i}."
        weights.rename_from_hf(LAYER_WEIGHTS, hf, out, p=p, h=h)
        if not cfg.is_moe_layer(i):
            continue
        for ours, name in EXPERT_NAMES.items():
            linears = weights.pop_indexed(hf, EXPERT.format(h=h, name=name), cfg.moe.num_experts)
            out[f"{p}ffn.experts.{ours}"] = expert_layout.experts_from_linears(linears)
    weights.check_consumed(hf, cfg.family)
    weights.tie_head(cfg, out)
    return out
