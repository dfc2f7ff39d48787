"""Parameter and FLOP accounting from a ModelConfig alone (no tensors), so full sizes cost nothing.

Conventions (stated because papers differ):
- `total` counts every trainable parameter, MTP modules included; buffers (expert biases) are not parameters.
- `active` counts the parameters a token passes through: everything except the routed experts it does not pick.
  Embedding and output head are included in both, as DeepSeek's "activated parameters" are.
- Training FLOPs per token = 6 × active matmul parameters (the embedding lookup is not a matmul; the output head is)
  + attention scores and context, 6·H·T·(d_qk + d_v) per layer for fwd+bwd over a full T×T score matrix
  (PaLM/torchtitan's convention, no causal halving; a sliding window caps T).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

from train.config import ModelConfig


def _attention_params(cfg: ModelConfig) -> int:
    a, d = cfg.attention, cfg.d_model
    if a.kind == "mla":
        qk = a.qk_nope_head_dim + a.qk_rope_head_dim
        if a.q_lora_rank:
            q = d * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * a.num_heads * qk
        else:
            q = d * a.num_heads * qk
        kv = d * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank
        kv += a.kv_lora_rank * a.num_heads * (a.qk_nope_head_dim + a.v_head_dim)
        return q + kv + a.num_heads * a.v_head_dim * d
    hd = cfg.head_dim
    q_out, kv_out = a.num_heads * hd, a.num_kv_heads * hd
    weights = d * q_out + 2 * d * kv_out + q_out * d
    biases = (q_out + 2 * kv_out if a.bias or a.qkv_bias else 0) + (d if a.bias else 0)
    qk_norm = {None: 0, "head": 2 * hd, "full": q_out + kv_out}[a.qk_norm]
    return weights + biases + qk_norm


def _attention_dims(cfg: ModelConfig) -> tuple[int, int, int]:
    a = cfg.attention
    if a.kind == "mla":
        return a.num_heads, a.qk_nope_head_dim + a.qk_rope_head_dim, a.v_head_dim
    return a.num_heads, cfg.head_dim, cfg.head_dim


@dataclass
class ParamBreakdown:
    """Parameter counts by part; `active_*` is per token."""

    parts: Dict[str, int] = field(default_factory=dict)
    active_parts: Dict[str, int] = field(default_factory=dict)

    def add(self, name: str, total: int, active: int | None = None) -> None:
        self.parts[name] = self.parts.get(name, 0) + total
        self.active_parts[name] = self.active_parts.get(name, 0) + (total if active is None else active)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def active(self) -> int:
        return sum(self.active_parts.values())


def _add_block(b: ParamBreakdown, cfg: ModelConfig, layer_idx: int, prefix: str = "") -> None:
    d, moe = cfg.d_model, cfg.moe
    b.add(prefix + "attention", _attention_params(cfg))
    b.add(prefix + "norms", (4 if cfg.post_sublayer_norm else 2) * d)
    if cfg.is_moe_layer(layer_idx):
        per_expert = 3 * d * moe.routed_hidden
        b.add(prefix + "routed_experts", moe.num_routed_experts * per_expert, moe.num_active_routed * per_expert)
        # hash routing has no gate; noisy top-k has a noise projection beside it
        gates = {"hash": 0, "noisy_topk": 2}.get(moe.router, 1)
        b.add(prefix + "router", gates * d * moe.num_routed_experts)
        if moe.num_shared_experts:
            b.add(prefix + "shared_experts", 3 * d * moe.shared_hidden + (d if moe.shared_expert_gate else 0))
    else:
        b.add(prefix + "dense_ffn", 3 * d * cfg.dense_hidden)


def param_breakdown(cfg: ModelConfig) -> ParamBreakdown:
    b = ParamBreakdown()
    d = cfg.d_model
    b.add("embedding", cfg.vocab_size * d)
    for i in range(cfg.num_layers):
        _add_block(b, cfg, i)
    b.add("norms", d)
    if not cfg.tie_embeddings:
        b.add("lm_head", cfg.vocab_size * d)
    for k in range(cfg.mtp_depth):
        # enorm, hnorm, eh_proj (2D -> D), its own block and its own final norm; embedding and head are shared.
        b.add("mtp", 3 * d + 2 * d * d)
        _add_block(b, cfg, cfg.num_layers + k, prefix="mtp/")
    return b


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token, attention included. See the module docstring."""
    b = param_breakdown(cfg)
    matmul_active = b.active - b.active_parts.get("embedding", 0)
    if cfg.tie_embeddings:  # the tied head is still a matmul
        matmul_active += cfg.vocab_size * cfg.d_model
    heads, d_qk, d_v = _attention_dims(cfg)
    window = cfg.attention.sliding_window
    t_eff = min(seq_len, window) if window else seq_len
    num_attn_layers = cfg.num_layers + cfg.mtp_depth
    return 6.0 * matmul_active + 6.0 * num_attn_layers * heads * t_eff * (d_qk + d_v)


def block_flops_per_token(cfg: ModelConfig, layer_idx: int, seq_len: int) -> float:
    """Training FLOPs per token of block `layer_idx` (an MTP module's block: num_layers + k - 1), by the module
    docstring's convention: 6 × its active parameters + its attention scores and context. The per-stage pieces
    of `flops_per_token` (the step-time planner, train/plan/time.py)."""
    b = ParamBreakdown()
    _add_block(b, cfg, layer_idx)
    heads, d_qk, d_v = _attention_dims(cfg)
    window = cfg.attention.sliding_window
    t_eff = min(seq_len, window) if window else seq_len
    return 6.0 * b.active + 6.0 * heads * t_eff * (d_qk + d_v)


def attention_core_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of one block's attention scores and context (what `selective` checkpointing
    recomputes besides norms and activations): 2·H·T·(d_qk + d_v)."""
    heads, d_qk, d_v = _attention_dims(cfg)
    window = cfg.attention.sliding_window
    return 2.0 * heads * (min(seq_len, window) if window else seq_len) * (d_qk + d_v)
