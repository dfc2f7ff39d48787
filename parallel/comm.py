"""Differentiable collectives used by the expert-parallel dispatcher.

`all_to_all(tensors, out_splits, in_splits, group)` exchanges several row-major tensors with the same split
sizes (token rows, gate weights, expert ids) in ONE autograd node and ONE collective: the rows of every tensor are
packed side by side into a single byte buffer (`pack_rows`), sent with one `all_to_all_single`, and read back
as views of the received buffer (`unpack_rows`). One node matters for correctness: every rank of the group must
enter the backward collectives in the same order, and a single node fixes it whatever order the autograd engine
would choose among separate nodes. One collective matters for speed: each launch costs a round of latency and,
on NCCL, a kernel; the gate weights and ids are a few bytes per row and would each pay it. Gradients of tensors
that require none are not sent back.

`fp8_rows=True` sends the first tensor as FP8 e4m3 with one fp32 scale per 1×128 tile of each row (DeepSeek-V3's
dispatch recipe; per row when the width is not a multiple of 128) and dequantizes it into its own dtype on
arrival; the backward sends its gradient back in that dtype (straight-through: quantization is treated as the
identity, as DeepSeek-V3 keeps the backward all-to-all in bf16).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
FP8_TILE = 128


@dataclass(frozen=True)
class RowLayout:
    """Where each tensor's row lives in a packed byte row: (dtype, shape of one row, byte offset, byte width)."""

    segments: tuple[tuple[torch.dtype, tuple[int, ...], int, int], ...]
    row_bytes: int  # padded to the largest element size, so every segment's view is aligned


def pack_rows(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, RowLayout, list[int]]:
    """(rows, uint8 bytes per row) buffer holding row i of every tensor side by side; its layout; and the order
    the tensors were placed in (widest element first, so every offset is a multiple of its element size)."""
    order = sorted(range(len(tensors)), key=lambda i: -tensors[i].element_size())
    rows = tensors[0].shape[0]
    parts, segments, offset = [], [None] * len(tensors), 0
    for i in order:
        t = tensors[i].contiguous()
        if t.shape[0] != rows:
            raise ValueError(f"pack_rows: tensor {i} has {t.shape[0]} rows, the first {rows}")
        b = t.reshape(rows, math.prod(t.shape[1:])).view(torch.uint8)
        segments[i] = (t.dtype, tuple(t.shape[1:]), offset, b.shape[1])
        parts.append(b)
        offset += b.shape[1]
    align = max(t.element_size() for t in tensors)
    pad = -offset % align
    if pad:
        parts.append(parts[0].new_zeros(rows, pad))
    buf = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    return buf, RowLayout(tuple(segments), offset + pad), order


def unpack_rows(buf: torch.Tensor, layout: RowLayout) -> list[torch.Tensor]:
    """The tensors `pack_rows` packed, as views of `buf` (rows of any count, in the original order)."""
    rows = buf.shape[0]
    return [buf[:, off : off + width].view(dtype).view(rows, *shape)
            for dtype, shape, off, width in layout.segments]


def _exchange(tensors, out_splits, in_splits, group):
    buf, layout, _ = pack_rows(tensors)
    out = buf.new_empty((sum(out_splits), layout.row_bytes))
    dist.all_to_all_single(out, buf, out_splits, in_splits, group=group)
    return unpack_rows(out, layout)


def quantize_rows_fp8(x_CD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 values and fp32 scales, one per 1×128 tile of each row (per row if D is not a multiple of 128):
    x ≈ q · scale, the tile's absolute maximum mapped to 448."""
    C, D = x_CD.shape
    tile = FP8_TILE if D % FP8_TILE == 0 else D
    x_CND = x_CD.float().view(C, D // tile, tile)
    scale_CN = x_CND.abs().amax(-1).clamp(min=1e-12) / FP8_MAX
    q_CD = (x_CND / scale_CN[..., None]).to(FP8).view(C, D)
    return q_CD, scale_CN


def dequantize_rows_fp8(q_CD: torch.Tensor, scale_CN: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    C, D = q_CD.shape
    n = scale_CN.shape[1]
    return (q_CD.float().view(C, n, D // n) * scale_CN[..., None]).view(C, D).to(dtype)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out_splits, in_splits, group, fp8_rows, *tensors):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        if fp8_rows:
            q, scale = quantize_rows_fp8(tensors[0])
            q, scale, *rest = _exchange([q, scale, *tensors[1:]], out_splits, in_splits, group)
            outs = [dequantize_rows_fp8(q, scale, tensors[0].dtype), *rest]
        else:
            outs = _exchange(tensors, out_splits, in_splits, group)
        for t, o in zip(tensors, outs):
            if not t.is_floating_point():
                ctx.mark_non_differentiable(o)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        # reverse exchange: what came from rank s goes back to rank s
        need = [i for i, n in enumerate(ctx.needs_input_grad[4:]) if n]
        result = [None] * len(grads)
        if need:
            back = _exchange([grads[i] for i in need], ctx.in_splits, ctx.out_splits, ctx.group)
            for i, g in zip(need, back):
                result[i] = g
        return (None, None, None, None, *result)


def all_to_all(tensors: Sequence[torch.Tensor], out_splits: list[int], in_splits: list[int],
               group, fp8_rows: bool = False) -> tuple[torch.Tensor, ...]:
    """Row all-to-all within `group` with uneven splits, differentiable, in one collective.

    Before: each rank holds tensors whose first `in_splits[s]` rows (in order) go to group rank s.
    After: each rank holds tensors of `sum(out_splits)` rows, `out_splits[s]` of them from group rank s, in
    rank order (views of one received buffer). Backward sends gradients back along the reverse route.
    `fp8_rows`: the first tensor (D wide) crosses as e4m3 with tile scales (module docstring).
    """
    return _AllToAll.apply(list(out_splits), list(in_splits), group, fp8_rows, *tensors)


def exchange_counts(send_counts_R: torch.Tensor, group) -> torch.Tensor:
    """Each rank holds how many rows (of each kind: trailing dims) it will send to every group rank; returns how
    many it will receive, in the same shape."""
    recv = torch.empty_like(send_counts_R)
    dist.all_to_all_single(recv, send_counts_R.contiguous(), group=group)
    return recv


def wire_bytes_per_row(tensors: Sequence[torch.Tensor], fp8_rows: bool = False) -> int:
    """Bytes one packed row of `tensors` occupies on the wire (with `fp8_rows`, the first as e4m3 + scales)."""
    if fp8_rows:
        q, scale = quantize_rows_fp8(tensors[0][:1])
        tensors = [q, scale, *[t[:1] for t in tensors[1:]]]
    return pack_rows([t[:1] for t in tensors])[1].row_bytes
