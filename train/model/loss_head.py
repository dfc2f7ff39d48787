"""The output head and a cross-entropy that never holds the whole (N, V) logits.

Shapes: N tokens (the micro-batch's B·T, flattened), C tokens of one chunk, D model dim, V vocabulary.

`chunked_cross_entropy` computes the summed next-token loss C tokens at a time: each chunk's logits are made,
upcast to fp32, reduced to a log-sum-exp and the target's logit, and dropped. Backward keeps only the inputs
(h, the weight, the labels) and the (N,) log-sum-exps, and recomputes one chunk's logits at a time. Peak memory
of the loss is then C·V, not N·V, for the price of one more head GEMM in backward. Loss and gradients are those of
`F.cross_entropy(F.linear(h, W).float(), labels, reduction="sum")` up to fp32 summation order (tests/unit/
test_loss_head.py).

The backward is written by hand (softmax − one-hot, scaled) rather than as `torch.utils.checkpoint` around each
chunk: a checkpointed chunk re-saves its fp32 log-softmax and then builds the logits' gradient beside it (2·C·V
fp32 at once, against one C·V buffer that the softmax gradient overwrites in place here); under autocast every
chunk would reuse autocast's one cached bf16 copy of the weight, so the weight's gradient would be summed over the
chunks in bf16 (here: in an fp32 accumulator); and recomputation would call the head module again during backward,
under ZeRO-3's hooks, which DeepSpeed's parameter prefetch trace does not expect.

`OutputHead` is the model's `lm_head`: an `nn.Linear` whose call also computes this loss, so the loss's use of the
weight happens inside the module's own call. Hooks placed around module calls then see it: DeepSpeed ZeRO-3
gathers a partitioned weight for the call and again before the call's backward, exactly as for the logits.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def compute_dtype(h_ND: torch.Tensor) -> torch.dtype:
    """The dtype `F.linear(h, W)` computes in here: autocast's when it is on for h's device, else h's own."""
    device_type = h_ND.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return h_ND.dtype


def _no_autocast(device_type: str):
    """The Function casts by hand (the dtype autocast would pick, `compute_dtype`), so it runs with autocast off."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _chunk_logits(h_CD: torch.Tensor, w_VD: torch.Tensor, dtype: torch.dtype, multiplier: float) -> torch.Tensor:
    """One chunk's fp32 logits, with the ops (and roundings) of the unchunked path: the GEMM in `dtype`, the
    multiplier applied in `dtype`, then the upcast."""
    logits_CV = F.linear(h_CD.to(dtype), w_VD)
    if multiplier != 1.0:
        logits_CV = logits_CV * multiplier
    return logits_CV.float()


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Summed CE over labels != IGNORE_INDEX of the logits `multiplier · h W^T`, C = `chunk` rows at a time."""

    @staticmethod
    def forward(ctx, h_ND, w_VD, labels_N, chunk: int, multiplier: float, dtype: torch.dtype):
        n = h_ND.shape[0]
        with _no_autocast(h_ND.device.type):
            w_cast_VD = w_VD.to(dtype)  # one transient copy under autocast (a no-op in fp32)
            lse_N = h_ND.new_empty(n, dtype=torch.float32)
            loss = h_ND.new_zeros((), dtype=torch.float32)
            for start in range(0, n, chunk):
                end = min(start + chunk, n)
                z_CV = _chunk_logits(h_ND[start:end], w_cast_VD, dtype, multiplier)
                lse_C = torch.logsumexp(z_CV, dim=-1)
                lse_N[start:end] = lse_C
                y_C = labels_N[start:end]
                z_y_C = z_CV.gather(1, y_C.clamp(min=0).unsqueeze(1)).squeeze(1)
                loss += torch.where(y_C != IGNORE_INDEX, lse_C - z_y_C, 0.0).sum()
                del z_CV
        ctx.save_for_backward(h_ND, w_VD, labels_N, lse_N)
        ctx.chunk, ctx.multiplier, ctx.dtype = chunk, multiplier, dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        h_ND, w_VD, labels_N, lse_N = ctx.saved_tensors
        chunk, multiplier, dtype = ctx.chunk, ctx.multiplier, ctx.dtype
        need_h, need_w = ctx.needs_input_grad[:2]
        n = h_ND.shape[0]
        grad_h_ND = torch.empty_like(h_ND) if need_h else None
        # fp32 whatever the compute dtype: the chunks' contributions are summed here, not in bf16
        grad_w_VD = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device) if need_w else None
        with _no_autocast(h_ND.device.type):
            w_cast_VD = w_VD.to(dtype)
            for start in range(0, n, chunk):
                end = min(start + chunk, n)
                h_CD = h_ND[start:end]
                y_C = labels_N[start:end]
                valid_C = y_C != IGNORE_INDEX
                # d loss / d z = grad · (softmax(z) − onehot(y)) on kept rows, 0 on ignored ones: built in place
                g_CV = _chunk_logits(h_CD, w_cast_VD, dtype, multiplier)
                g_CV.sub_(lse_N[start:end].unsqueeze(1)).exp_()
                g_CV.scatter_add_(1, y_C.clamp(min=0).unsqueeze(1),
                                  torch.full((end - start, 1), -1.0, dtype=g_CV.dtype, device=g_CV.device))
                g_CV.mul_((valid_C * grad_loss).unsqueeze(1))
                # back through the upcast and the multiplier, as autograd would: in the compute dtype
                g_CV = g_CV.to(dtype)
                if multiplier != 1.0:
                    g_CV = g_CV * multiplier
                if need_h:
                    grad_h_ND[start:end] = g_CV @ w_cast_VD
                if need_w:
                    if dtype == torch.float32:
                        grad_w_VD.addmm_(g_CV.t(), h_CD)
                    else:
                        grad_w_VD += g_CV.t() @ h_CD.to(dtype)
                del g_CV
        if grad_w_VD is not None:
            grad_w_VD = grad_w_VD.to(w_VD.dtype)
        return grad_h_ND, grad_w_VD, None, None, None, None


def chunked_cross_entropy(h_ND: torch.Tensor, w_VD: torch.Tensor, labels_N: torch.Tensor, chunk_tokens: int,
                          multiplier: float = 1.0) -> torch.Tensor:
    """Σ over labels != -100 of CE(multiplier · h W^T, labels), fp32, never holding more than `chunk_tokens`×V
    logits (see the module docstring). h (N, D) as the final norm gives it; W (V, D), tied or not. Under autocast
    the GEMMs run in autocast's dtype, as `F.linear` would there, and the logits are upcast per chunk."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be >= 1")
    return _ChunkedCrossEntropy.apply(h_ND, w_VD, labels_N, chunk_tokens, multiplier, compute_dtype(h_ND))


class OutputHead(nn.Linear):
    """The output projection D → V (no bias; `weight` is the embedding's when tied).

    `head(h_BTD)`: the logits (B, T, V) in the compute dtype, times `multiplier` (Grok-1's output multiplier).
    `head(h_BTD, labels_BT, chunk_tokens=C)`: instead the summed fp32 cross-entropy of those logits over labels
    != -100 (`chunked_cross_entropy`), no logits returned. The loss is computed inside the module's call so that
    whatever wraps module calls (ZeRO-3's gather of a partitioned weight, before the call and before its backward)
    also covers the weight's use by the loss."""

    def __init__(self, d_model: int, vocab_size: int):
        super().__init__(d_model, vocab_size, bias=False)

    def head_weight(self) -> torch.Tensor:
        """The weight both paths multiply with: the Parameter itself (precision converters return their copy)."""
        return self.weight

    def forward(self, h_BTD: torch.Tensor, labels_BT: Optional[torch.Tensor] = None, chunk_tokens: int = 0,
                multiplier: float = 1.0) -> torch.Tensor:
        if labels_BT is None:
            logits_BTV = F.linear(h_BTD, self.head_weight())
            return logits_BTV * multiplier if multiplier != 1.0 else logits_BTV
        return chunked_cross_entropy(h_BTD.flatten(0, -2), self.head_weight(), labels_BT.flatten(), chunk_tokens,
                                     multiplier)
