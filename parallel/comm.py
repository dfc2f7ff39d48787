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


def pack_rows(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, RowLayout]:
    """(rows, uint8 bytes per row) buffer holding row i of every tensor side by side, widest element first (so every
    offset is a multiple of its element size), and its layout."""
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
    return buf, RowLayout(tuple(segments), offset + pad)


def unpack_rows(buf: torch.Tensor, layout: RowLayout) -> list[torch.Tensor]:
    """The tensors `pack_rows` packed, as views of `buf` (rows of any count, in the original order)."""
    rows = buf.shape[0]
    return [buf[:, off : off + width].view(dtype).view(rows, *shape)
            for dtype, shape, off, width in layout.segments]


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


class PendingAllToAll:
    """An all-to-all in flight: `all_to_all_start` launched it, `wait()` returns its tensors. Between the two the
    caller computes whatever does not need them (the shared expert while the combine is on the wire).

    Autograd: two nodes, the launch and the wait, linked by an empty tensor so that the wait's backward (the
    reverse exchange, which hands the gradients to the launch) runs before the launch's backward (which returns
    them to the inputs). One reverse exchange per all-to-all, in the order of the waits, on every rank alike."""

    def __init__(self, out_splits: list[int], in_splits: list[int], group, fp8_rows: bool):
        self.out_splits, self.in_splits, self.group, self.fp8_rows = out_splits, in_splits, group, fp8_rows
        self._launched = None
        self.needs_grad: tuple[bool, ...] = ()
        self.input_grads: list = []
        self._link: torch.Tensor | None = None
        self._done = False

    def _launch(self, tensors) -> None:
        dtype = tensors[0].dtype
        wire = list(tensors)
        if self.fp8_rows:
            q, scale = quantize_rows_fp8(tensors[0])
            wire = [q, scale, *tensors[1:]]
        buf, layout = pack_rows(wire)
        out = buf.new_empty((sum(self.out_splits), layout.row_bytes))
        work = dist.all_to_all_single(out, buf, self.out_splits, self.in_splits, group=self.group, async_op=True)
        # `buf` must live until the collective completes
        self._launched = (work, buf, out, layout, dtype)

    def _finish(self) -> list[torch.Tensor]:
        work, _buf, out, layout, dtype = self._launched
        work.wait()
        outs = unpack_rows(out, layout)
        if self.fp8_rows:
            q, scale, *rest = outs
            outs = [dequantize_rows_fp8(q, scale, dtype), *rest]
        self._launched = None
        return outs

    def wait(self) -> tuple[torch.Tensor, ...]:
        """The received tensors (module docstring of `all_to_all`); call exactly once."""
        if self._done:
            raise RuntimeError("PendingAllToAll.wait() called twice")
        self._done = True
        link, self._link = self._link, None  # the wait node holds it now; kept here, it would close a cycle
        # (launch node -> ctx -> self -> link -> launch node) that keeps the graph above the launch alive after
        # backward, with the saved tensors of every node a zero-bubble weight pass leaves (they go with the graph)
        return _Wait.apply(self, link)


class _Launch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pending: PendingAllToAll, *tensors):
        pending.needs_grad = tuple(ctx.needs_input_grad[1:])
        pending._launch(tensors)
        ctx.pending = pending
        return tensors[0].new_empty(0, dtype=torch.float32)  # the link to the wait node

    @staticmethod
    def backward(ctx, _link_grad):
        grads, ctx.pending.input_grads = ctx.pending.input_grads, []
        return (None, *grads)


class _Wait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pending: PendingAllToAll, _link):
        outs = pending._finish()
        for o in outs:
            if not o.is_floating_point():
                ctx.mark_non_differentiable(o)
        ctx.pending = pending
        ctx.link_grad = torch.zeros_like(_link)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        # reverse exchange: what came from rank s goes back to rank s (in the compute dtype, also after fp8)
        p = ctx.pending
        need = [i for i, n in enumerate(p.needs_grad) if n]
        result = [None] * len(p.needs_grad)
        if need:
            reverse = PendingAllToAll(p.in_splits, p.out_splits, p.group, fp8_rows=False)
            reverse._launch([grads[i] for i in need])
            back = reverse._finish()
            for i, g in zip(need, back):
                result[i] = g
        p.input_grads = result
        return None, ctx.link_grad


def all_to_all_start(tensors: Sequence[torch.Tensor], out_splits: list[int], in_splits: list[int],
                     group, fp8_rows: bool = False) -> PendingAllToAll:
    """Launch `all_to_all` asynchronously; `.wait()` on the result gives what `all_to_all` returns."""
    pending = PendingAllToAll(list(out_splits), list(in_splits), group, fp8_rows)
    pending._link = _Launch.apply(pending, *tensors)
    return pending


def all_to_all(tensors: Sequence[torch.Tensor], out_splits: list[int], in_splits: list[int],
               group, fp8_rows: bool = False) -> tuple[torch.Tensor, ...]:
    """Row all-to-all within `group` with uneven splits, differentiable, in one collective.

    Before: each rank holds tensors whose first `in_splits[s]` rows (in order) go to group rank s.
    After: each rank holds tensors of `sum(out_splits)` rows, `out_splits[s]` of them from group rank s, in
    rank order (views of one received buffer). Backward sends gradients back along the reverse route.
    `fp8_rows`: the first tensor (D wide) crosses as e4m3 with tile scales (module docstring).
    """
    return all_to_all_start(tensors, out_splits, in_splits, group, fp8_rows).wait()


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
