"""Grouped-query attention (Mixtral, DBRX, DeepSeekMoE) and the pieces MLA shares with it: the per-layer KV
cache and the masked scaled-dot-product call.

Shapes: B batch, T new tokens, S keys (cached + new), H query heads, Hkv key/value heads, Dh head dim,
P rotated pairs (rotary dim / 2).
Positions are (T,), shared by the rows, or (B, T) per row with document masking (`train/model/documents.py`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from train.config.model import ModelConfig
from train.model.documents import document_attention_mask
from train.model.norms import RMSNorm
from train.model.rope import RotaryEmbedding, apply_rotary


@dataclass
class KVCache:
    """One layer's keys and values for incremental decoding, (B, heads, S, dim) each, positions 0..S-1 in
    order. Keys are stored after RoPE. A fresh cache is empty; every forward appends its T new tokens."""

    k: Optional[torch.Tensor] = None
    v: Optional[torch.Tensor] = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new tokens' k/v along the sequence dim; returns everything cached so far."""
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k = torch.cat((self.k, k), dim=2)
            self.v = torch.cat((self.v, v), dim=2)
        return self.k, self.v


def attention_mask(num_queries: int, num_keys: int, sliding_window: Optional[int], device,
                   chunk_size: Optional[int] = None) -> torch.Tensor:
    """Boolean (T, S) mask, True = attend. The queries are the last T of the S keys; query i (key index
    q = S - T + i) sees key j when q - window < j <= q, as Mixtral's sliding-window mask does, and, with
    `chunk_size` C (Llama 4), only when j // C == q // C."""
    q_T1 = torch.arange(num_keys - num_queries, num_keys, device=device)[:, None]
    k_1S = torch.arange(num_keys, device=device)[None, :]
    mask_TS = k_1S <= q_T1
    if sliding_window is not None:
        mask_TS = mask_TS & (k_1S > q_T1 - sliding_window)
    if chunk_size is not None:
        mask_TS = mask_TS & (k_1S // chunk_size == q_T1 // chunk_size)
    return mask_TS


def attend(
    q_BHTD: torch.Tensor,
    k_BHSD: torch.Tensor,
    v_BHSD: torch.Tensor,
    scale: float,
    sliding_window: Optional[int],
    softcap: Optional[float] = None,
    chunk_size: Optional[int] = None,
    keep_B1TS: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Causal (optionally windowed) softmax attention of the T newest positions over all S keys.

    `keep_B1TS` (document masking): a boolean mask, True = attend, that replaces the causal, window and chunk
    mask built here; the caller has folded all of them into it (`document_attention_mask`).

    With `softcap` (Grok-1) the scores s become softcap · tanh(s / softcap) before masking: SDPA cannot do
    that, so the scores are materialised and the softmax taken in fp32.

    The mask is materialised only when `is_causal` cannot express it: a sliding window, or several new
    tokens after a non-empty cache (SDPA's `is_causal` aligns the triangle top-left, not bottom-right).
    """
    num_queries, num_keys = q_BHTD.shape[2], k_BHSD.shape[2]
    if softcap is not None:
        s_BHTS = (q_BHTD @ k_BHSD.transpose(-1, -2)).float() * scale
        s_BHTS = softcap * torch.tanh(s_BHTS / softcap)
        if keep_B1TS is None:
            keep_TS = attention_mask(num_queries, num_keys, sliding_window, q_BHTD.device, chunk_size)
        else:
            keep_TS = keep_B1TS
        p_BHTS = s_BHTS.masked_fill(~keep_TS, float("-inf")).softmax(-1).to(v_BHSD.dtype)
        return p_BHTS @ v_BHSD
    if keep_B1TS is not None:
        # On CUDA too this is SDPA with the boolean mask (no FlexAttention or varlen kernel yet).
        return F.scaled_dot_product_attention(q_BHTD, k_BHSD, v_BHSD, attn_mask=keep_B1TS, scale=scale)
    mask, is_causal = None, False
    if sliding_window is not None or chunk_size is not None or num_queries not in (1, num_keys):
        mask = attention_mask(num_queries, num_keys, sliding_window, q_BHTD.device, chunk_size)
    elif num_queries == num_keys:
        is_causal = num_queries > 1
    return F.scaled_dot_product_attention(q_BHTD, k_BHSD, v_BHSD, attn_mask=mask, is_causal=is_causal, scale=scale)


def repeat_kv(x_BHSD: torch.Tensor, num_rep: int) -> torch.Tensor:
    """Repeat each key/value head `num_rep` times, adjacent (head h serves query heads h·rep .. h·rep+rep-1)."""
    if num_rep == 1:
        return x_BHSD
    b, h, s, d = x_BHSD.shape
    return x_BHSD[:, :, None].expand(b, h, num_rep, s, d).reshape(b, h * num_rep, s, d)


class GroupedQueryAttention(nn.Module):
    """Multi-head attention with `num_kv_heads` ≤ `num_heads` shared key/value heads and RoPE.

    `clip_qkv` (DBRX) clamps the projected q, k, v to [-clip, clip] before RoPE; `sliding_window` (Mixtral)
    restricts token i to keys j with i - window < j <= i. `qk_norm` (Qwen3: `head`, OLMoE: `full`) applies an
    RMSNorm to the projected q and k, after the clip and before RoPE. Llama 4's NoPE layers
    (`nope_layer_interval`, by `layer_idx`) skip RoPE and may scale q by a position-dependent temperature; its
    RoPE layers attend within `chunk_size` chunks.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        a = cfg.attention
        a.validate()
        self.num_heads, self.num_kv_heads, self.head_dim = a.num_heads, a.num_kv_heads, cfg.head_dim
        self.clip_qkv, self.sliding_window, self.softcap = a.clip_qkv, a.sliding_window, a.logit_softcap
        self.interleaved = cfg.rope.interleaved
        self.scale = self.head_dim**-0.5
        d, hd = cfg.d_model, self.head_dim
        qkv_bias = a.bias or a.qkv_bias
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=qkv_bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=a.bias)
        self.rope = RotaryEmbedding(hd, cfg.rope)
        self.qk_norm = a.qk_norm
        self.use_rope = a.nope_layer_interval is None or (layer_idx + 1) % a.nope_layer_interval != 0
        self.temperature = (a.temperature_floor_scale, a.temperature_scale) if not self.use_rope else None
        if self.temperature is not None and self.temperature[0] is None:
            self.temperature = None
        self.chunk_size = a.chunk_size if self.use_rope else None
        if a.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(hd, cfg.norm_eps), RMSNorm(hd, cfg.norm_eps)
        elif a.qk_norm == "full":
            self.q_norm = RMSNorm(self.num_heads * hd, cfg.norm_eps)
            self.k_norm = RMSNorm(self.num_kv_heads * hd, cfg.norm_eps)

    def qkv(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projected (and clipped) q (B, H, T, Dh), k and v (B, Hkv, T, Dh), before RoPE."""
        b, t, _ = x_BTD.shape
        q, k, v = self.q_proj(x_BTD), self.k_proj(x_BTD), self.v_proj(x_BTD)
        if self.clip_qkv is not None:
            q, k, v = (y.clamp(-self.clip_qkv, self.clip_qkv) for y in (q, k, v))
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, t, self.num_heads, self.head_dim)
        k = k.view(b, t, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def forward(
        self, x_BTD: torch.Tensor, positions: torch.Tensor, kv_cache: Optional[KVCache] = None,
        document_ids_BT: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Attention output (B, T, D). `positions` (T,) or (B, T); with `document_ids_BT` (then no cache and
        (B, T) positions that restart per document) each token attends only within its document."""
        b, t, _ = x_BTD.shape
        q, k, v = self.qkv(x_BTD)
        if self.use_rope:
            cos_TP, sin_TP = self.rope(positions)
            q = apply_rotary(q, cos_TP, sin_TP, self.interleaved)
            k = apply_rotary(k, cos_TP, sin_TP, self.interleaved)
        elif self.temperature is not None:  # Llama 4's attention temperature on NoPE layers
            floor_scale, scale = self.temperature
            t_T = torch.log1p(torch.floor((positions.float() + 1.0) / floor_scale)) * scale + 1.0
            # (T,) scales the T axis of q (B, H, T, Dh); (B, T) per-row positions need the B axis too.
            t_T = t_T[:, None, :, None] if t_T.dim() == 2 else t_T[:, None]
            q = (q * t_T).to(q.dtype)
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)
        rep = self.num_heads // self.num_kv_heads
        keep_B1TS = None
        if document_ids_BT is not None:
            keep_B1TS = document_attention_mask(document_ids_BT, positions, self.sliding_window, self.chunk_size)
        o_BHTD = attend(q, repeat_kv(k, rep), repeat_kv(v, rep), self.scale, self.sliding_window, self.softcap,
                        self.chunk_size, keep_B1TS)
        return self.o_proj(o_BHTD.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))
