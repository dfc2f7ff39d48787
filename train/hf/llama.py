"""Dense Llama-style Hugging Face folders (Llama, Mistral, Qwen2) → our dense model, for upcycling
(`train/upcycle.py`). Qwen2 is a Llama with biases on q/k/v (`attention.qkv_bias`).

Our model has no dense family of its own: a dense model is one whose layers all sit before `moe.first_k_dense`,
each feed-forward a `SwiGLU` of width `dense_hidden`. The family is `mixtral`, which is exactly a Llama/Mistral
with an MoE feed-forward, so the upcycled model exports as `MixtralForCausalLM`.

Import only: the dense model is a stepping stone, never exported back to a dense HF class.
"""
from __future__ import annotations

from typing import Any

from train.config.model import ModelConfig
from train.hf import fields, rope, weights
from train.hf.errors import HFConversionError
from train.hf.fields import Field
from train.hf.weights import StateDict, Weight

MODEL_TYPES = ("llama", "mistral", "qwen2")
BASE_CONFIG = "mixtral_8x7b"  # training-only settings (balance coefficient, routing) of the upcycled model

FIELDS = (
    *fields.LLAMA_STYLE_FIELDS,
    Field("attention.num_heads", "num_attention_heads"),
    Field("attention.num_kv_heads", "num_key_value_heads"),
    Field("dense_hidden", "intermediate_size"),
)

WEIGHTS = weights.LLAMA_STYLE_WEIGHTS

LAYER_WEIGHTS = (
    *weights.LLAMA_STYLE_LAYER_WEIGHTS,
    Weight("{p}ffn.w_gate.weight", "{h}mlp.gate_proj.weight"),
    Weight("{p}ffn.w_up.weight", "{h}mlp.up_proj.weight"),
    Weight("{p}ffn.w_down.weight", "{h}mlp.down_proj.weight"),
)

QKV_BIASES = (  # Qwen2 only
    Weight("{p}attn.q_proj.bias", "{h}self_attn.q_proj.bias"),
    Weight("{p}attn.k_proj.bias", "{h}self_attn.k_proj.bias"),
    Weight("{p}attn.v_proj.bias", "{h}self_attn.v_proj.bias"),
)


def check_model_type(model_type: str, where: str) -> None:
    """A clear error for anything but a dense Llama or Mistral config."""
    if model_type in MODEL_TYPES:
        return
    if model_type in ("mixtral", "dbrx", "deepseek_v2", "deepseek_v3", "qwen2_moe", "qwen3_moe", "olmoe"):
        raise HFConversionError(f"{where} is already an MoE model (model_type {model_type!r}): upcycling starts "
                                "from a dense model; import an MoE folder with `scripts/convert_hf.py import`")
    raise HFConversionError(f"{where}: cannot upcycle HF model_type {model_type!r}; supported dense model types: "
                            f"{', '.join(MODEL_TYPES)}")


def model_config(hf: Any, cfg: ModelConfig) -> None:
    """Fill `cfg` (a copy of BASE_CONFIG) in place as the dense model of a loaded Llama/Mistral config."""
    where = f"{hf.model_type} config"
    fields.require_silu(hf, hf.model_type)
    if getattr(hf, "attention_bias", False):
        raise HFConversionError(f"{where}: attention_bias=true is not supported (moeforge's Llama-style attention "
                                "has no biases)")
    if getattr(hf, "mlp_bias", False):
        raise HFConversionError(f"{where}: mlp_bias=true is not supported (moeforge's SwiGLU has no biases)")
    fields.fields_from_hf(FIELDS, hf, cfg)
    head_dim = getattr(hf, "head_dim", None)
    cfg.attention.head_dim = head_dim if head_dim is not None else cfg.d_model // cfg.attention.num_heads
    cfg.attention.kind, cfg.attention.bias, cfg.attention.clip_qkv = "gqa", False, None
    cfg.attention.qkv_bias = hf.model_type == "qwen2"
    cfg.attention.sliding_window = getattr(hf, "sliding_window", None)  # Mistral; Llama has none
    if hf.model_type == "qwen2" and not getattr(hf, "use_sliding_window", False):
        cfg.attention.sliding_window = None  # Qwen2 carries a window size it does not use unless asked
    elif hf.model_type == "qwen2":
        raise HFConversionError(f"{where}: use_sliding_window=true (Qwen2 windows only some layers, "
                                "max_window_layers); moeforge windows every layer or none")
    params = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None)
    cfg.rope.theta, cfg.rope.scaling = rope.from_hf(params, getattr(hf, "rope_theta", None))
    cfg.rope.interleaved = False
    cfg.norm = "rmsnorm"
    cfg.mtp_depth = 0
    fields.set_topk_softmax_routing(cfg)
    cfg.moe.expert_hidden = cfg.dense_hidden
    cfg.moe.first_k_dense = cfg.num_layers  # every layer dense


def from_hf(cfg: ModelConfig, hf: StateDict, model_type: str) -> StateDict:
    """Our dense state dict from the HF tensors; consumed tensors are removed from `hf`."""
    out: StateDict = {}
    weights.rename_from_hf(WEIGHTS, hf, out)
    for i in range(cfg.num_layers):
        weights.rename_from_hf(LAYER_WEIGHTS, hf, out, p=f"layers.{i}.", h=f"model.layers.{i}.")
        if cfg.attention.qkv_bias:
            weights.rename_from_hf(QKV_BIASES, hf, out, p=f"layers.{i}.", h=f"model.layers.{i}.")
    weights.check_consumed(hf, model_type)
    weights.tie_head(cfg, out)
    return out
