"""DeepSeek-V2/V3 multi-head latent attention (MLA).

Queries go through a low-rank bottleneck (`q_a_proj` → RMSNorm → `q_b_proj`, or one `q_proj` when
`q_lora_rank` is null, as in V2-Lite). Keys and values are rebuilt per head from a shared `kv_lora_rank`
latent (`kv_a_proj_with_mqa` → `kv_a_layernorm` → `kv_b_proj`); the same projection also emits one RoPE key
of `qk_rope_head_dim` channels shared by all heads (the "decoupled" key, MQA-style). Per head the score is
q_nope·k_nope + q_rope·k_rope, scaled by (qk_nope + qk_rope)^-0.5 · yarn_get_mscale(factor, mscale_all_dim)².

Shapes: B batch, T new tokens, S keys, H heads, Dn nope dim, Dr rope dim, Dv value dim, L kv latent rank,
P = Dr/2 rotated pairs.
The KV cache holds the expanded per-head keys and values (simple; caching the latent would save memory).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from train.config.model import ModelConfig
from train.model.attention import KVCache, attend
from train.model.documents import document_attention_mask
from train.model.norms import RMSNorm
from train.model.rope import RotaryEmbedding, apply_rotary, softmax_mscale

# The latent norms use RMSNorm's default eps in DeepSeek's reference code and in HF (not `rms_norm_eps`).
LATENT_NORM_EPS = 1e-6


class MultiHeadLatentAttention(nn.Module):
    """MLA with parameter names as in the DeepSeek checkpoints (`q_a_proj`, `q_a_layernorm`, `q_b_proj` or
    `q_proj`, `kv_a_proj_with_mqa`, `kv_a_layernorm`, `kv_b_proj`, `o_proj`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        a = cfg.attention
        self.num_heads = a.num_heads
        self.q_lora_rank, self.kv_lora_rank = a.q_lora_rank, a.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim
        self.qk_dim = self.nope_dim + self.rope_dim
        self.interleaved = cfg.rope.interleaved
        self.scale = self.qk_dim**-0.5 * softmax_mscale(cfg.rope.scaling)
        d, h = cfg.d_model, self.num_heads
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(d, h * self.qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, self.q_lora_rank, bias=a.bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(self.q_lora_rank, h * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, self.kv_lora_rank + self.rope_dim, bias=a.bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, h * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(h * self.v_dim, d, bias=a.bias)
        self.rope = RotaryEmbedding(self.rope_dim, cfg.rope)

    def forward(
        self, x_BTD: torch.Tensor, positions: torch.Tensor, kv_cache: Optional[KVCache] = None,
        document_ids_BT: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Attention output (B, T, D). `positions` (T,) or (B, T); with `document_ids_BT` (then no cache and
        (B, T) positions that restart per document) each token attends only within its document."""
        b, t, _ = x_BTD.shape
        h = self.num_heads
        if self.q_lora_rank is None:
            q = self.q_proj(x_BTD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD)))
        q_BHTK = q.view(b, t, h, self.qk_dim).transpose(1, 2)
        q_nope, q_rope = q_BHTK.split([self.nope_dim, self.rope_dim], dim=-1)

        latent_BTL, k_rope_BTDr = self.kv_a_proj_with_mqa(x_BTD).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent_BTL))
        kv_BHTK = kv.view(b, t, h, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v_BHTV = kv_BHTK.split([self.nope_dim, self.v_dim], dim=-1)

        cos_TP, sin_TP = self.rope(positions)
        q_rope = apply_rotary(q_rope, cos_TP, sin_TP, self.interleaved)
        k_rope_B1TDr = apply_rotary(k_rope_BTDr[:, None], cos_TP, sin_TP, self.interleaved)

        q = torch.cat((q_nope, q_rope), dim=-1)
        k = torch.cat((k_nope, k_rope_B1TDr.expand(b, h, t, self.rope_dim)), dim=-1)
        v = v_BHTV
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)
        keep_B1TS = None
        if document_ids_BT is not None:
            keep_B1TS = document_attention_mask(document_ids_BT, positions, sliding_window=None)
        o_BHTV = attend(q, k, v, self.scale, sliding_window=None, keep_B1TS=keep_B1TS)
        return self.o_proj(o_BHTV.transpose(1, 2).reshape(b, t, h * self.v_dim))
