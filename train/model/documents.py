"""Document masking for packed rows: per-document positions and the attention mask that keeps each token inside
its own document.

`document_ids_BT[b, t]` is the index, within row b, of the document token t belongs to; it never decreases
along T and the EOD token belongs to the document it closes (row [a a a EOD b b EOD c] -> [0 0 0 0 1 1 1 2]).

Shapes: B batch, T tokens (queries and keys are the same T: no KV cache here).
"""
from __future__ import annotations

from typing import Optional

import torch


def document_positions(document_ids_BT: torch.Tensor) -> torch.Tensor:
    """Positions (B, T) that restart at 0 at each document: t minus the first t of token t's document.

    A document starts where the id differs from the previous token's; the start index is carried forward by a
    running maximum, so the whole thing is a few vectorised ops and no host sync.
    """
    b, t = document_ids_BT.shape
    t_T = torch.arange(t, device=document_ids_BT.device)
    starts_BT = torch.ones_like(document_ids_BT, dtype=torch.bool)
    starts_BT[:, 1:] = document_ids_BT[:, 1:] != document_ids_BT[:, :-1]
    first_BT = torch.where(starts_BT, t_T.expand(b, t), 0).cummax(dim=1).values
    return t_T - first_BT


def document_attention_mask(
    document_ids_BT: torch.Tensor,
    positions_BT: torch.Tensor,
    sliding_window: Optional[int],
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Boolean (B, 1, T, T) mask, True = attend: query i sees key j when both are in the same document, j <= i,
    and, with `sliding_window` W, i - W < j; with `chunk_size` C (Llama 4) also when positions[j] // C equals
    positions[i] // C. Chunks are cut on the per-document positions, so each document is chunked exactly as it
    would be alone; within one document the index window equals the position window."""
    t = document_ids_BT.shape[1]
    q_T1 = torch.arange(t, device=document_ids_BT.device)[:, None]
    k_1T = q_T1.view(1, t)
    keep_TT = k_1T <= q_T1
    if sliding_window is not None:
        keep_TT = keep_TT & (k_1T > q_T1 - sliding_window)
    keep_BTT = keep_TT & (document_ids_BT[:, :, None] == document_ids_BT[:, None, :])
    if chunk_size is not None:
        chunk_BT = positions_BT // chunk_size
        keep_BTT = keep_BTT & (chunk_BT[:, :, None] == chunk_BT[:, None, :])
    return keep_BTT[:, None]
