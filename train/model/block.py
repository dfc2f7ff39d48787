"""One pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x))."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from train.config.model import ModelConfig
from train.model.attention import GroupedQueryAttention, KVCache
from train.model.mla import MultiHeadLatentAttention
from train.model.mlp import SwiGLU
from train.model.moe.layer import MoELayer, MoELayerOutput
from train.model.norms import build_norm


def build_attention(cfg: ModelConfig, layer_idx: int = 0) -> nn.Module:
    """`cfg.attention.kind`: `gqa` (GroupedQueryAttention) or `mla` (MultiHeadLatentAttention)."""
    kind = cfg.attention.kind
    if kind == "gqa":
        return GroupedQueryAttention(cfg, layer_idx)
    if kind == "mla":
        return MultiHeadLatentAttention(cfg)
    raise ValueError(f"unknown attention kind {kind!r} (expected 'gqa' or 'mla')")


class Block(nn.Module):
    """Attention and feed-forward sublayers, each behind its own norm with a residual connection.

    The feed-forward is an `MoELayer` when `cfg.is_moe_layer(layer_idx)` (DeepSeek's first_k_dense and
    layer_freq rule), else a dense `SwiGLU` of width `cfg.dense_hidden`. MTP modules build their block with
    `layer_idx` = num_layers + k - 1, continuing the numbering. With `cfg.post_sublayer_norm` (Grok-1) each
    sublayer's output is normalised again before the residual add.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.attn_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.attn = build_attention(cfg, layer_idx)
        self.ffn_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        if self.is_moe:
            self.ffn = MoELayer(cfg.d_model, cfg.moe, cfg.init_std, cfg.ffn_activation)
        else:
            self.ffn = SwiGLU(cfg.d_model, cfg.dense_hidden, cfg.ffn_activation)
        self.post_norms = cfg.post_sublayer_norm
        if self.post_norms:
            self.attn_post_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
            self.ffn_post_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps)

    def token_mixing(
        self, x_BTD: torch.Tensor, positions: torch.Tensor, kv_cache: Optional[KVCache] = None,
        document_ids_BT: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything before the feed-forward: `h = x + attn(attn_norm(x))` and the FFN's input `ffn_norm(h)`.
        A method of its own so `parallel/activation_checkpointing.py` can recompute it as one region."""
        a_BTD = self.attn(self.attn_norm(x_BTD), positions, kv_cache, document_ids_BT)
        h_BTD = x_BTD + (self.attn_post_norm(a_BTD) if self.post_norms else a_BTD)
        return h_BTD, self.ffn_norm(h_BTD)

    def forward(
        self, x_BTD: torch.Tensor, positions: torch.Tensor, kv_cache: Optional[KVCache] = None,
        token_ids_BT: Optional[torch.Tensor] = None, document_ids_BT: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, Optional[MoELayerOutput]]:
        """`positions`: (T,), or (B, T) with `document_ids_BT`, which keeps attention within each document (see
        `train/model/documents.py`). `token_ids_BT`: the input ids, for routers that route on them (hash)."""
        h_BTD, ffn_in_BTD = self.token_mixing(x_BTD, positions, kv_cache, document_ids_BT=document_ids_BT)
        if self.is_moe:
            y_BTD, moe_out = self.ffn(ffn_in_BTD, token_ids_BT)
        else:
            y_BTD, moe_out = self.ffn(ffn_in_BTD), None
        if self.post_norms:
            y_BTD = self.ffn_post_norm(y_BTD)
        return h_BTD + y_BTD, moe_out
