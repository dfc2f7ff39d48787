"""DeepSeek-V3 multi-token prediction (MTP, V3 report §2.2).

Module k (1..D) at position i combines the previous depth's hidden state h^{k-1}_i (h^0 = the main model's
last hidden state, before its final norm) with the embedding of token t_{i+k}:
    h'_i = eh_proj([enorm(emb(t_{i+k})); hnorm(h^{k-1}_i)])
then runs its own transformer block and predicts t_{i+k+1} through its own final norm and the shared
`lm_head`. The concatenation puts the embedding first: the report writes [h; emb], but DeepSeek's released
weights (`enorm`, `hnorm`, `eh_proj`) and the inference code that loads them use [emb; h], and we keep
checkpoint compatibility.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from train.config.model import ModelConfig
from train.model.block import Block
from train.model.moe.layer import MoELayerOutput
from train.model.norms import build_norm


class MTPModule(nn.Module):
    """One MTP depth: `enorm`, `hnorm`, `eh_proj` (2D → D, no bias), `block`, final `norm`."""

    def __init__(self, cfg: ModelConfig, depth: int):
        super().__init__()
        self.depth = depth
        self.layer_idx = cfg.num_layers + depth - 1
        d = cfg.d_model
        self.enorm = build_norm(cfg.norm, d, cfg.norm_eps)
        self.hnorm = build_norm(cfg.norm, d, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.block = Block(cfg, self.layer_idx)
        self.norm = build_norm(cfg.norm, d, cfg.norm_eps)

    def forward(
        self, h_prev_BTD: torch.Tensor, emb_next_BTD: torch.Tensor, positions: torch.Tensor,
        document_ids_BT: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[MoELayerOutput]]:
        """Returns (h^k before the final norm, for the next depth; h^k after it, for the head; MoE output).

        `positions` and `document_ids_BT` are the main row's: position i stays in its document although its
        input embedding is that of token i + k, as in the main model's positions without document masking."""
        x_BTD = self.eh_proj(torch.cat((self.enorm(emb_next_BTD), self.hnorm(h_prev_BTD)), dim=-1))
        h_BTD, moe_out = self.block(x_BTD, positions, document_ids_BT=document_ids_BT)
        return h_BTD, self.norm(h_BTD), moe_out


def shift_left(x_BT: torch.Tensor, k: int, fill: int) -> torch.Tensor:
    """x[:, i + k] at position i, `fill` where i + k runs past the end."""
    if k == 0:
        return x_BT
    pad = x_BT.new_full((x_BT.shape[0], min(k, x_BT.shape[1])), fill)
    return torch.cat((x_BT[:, k:], pad), dim=1)
