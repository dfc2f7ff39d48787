"""fp32 computations on a bf16 input that keep the input, not its fp32 copy, for backward.

Norms take their statistics in fp32 and the router's gate multiplies in fp32, so both start with `x.float()`. Under
autograd the ops after that save the fp32 copy (4 bytes per element beside the input's 2) and, for a norm, a bf16
normalised input as well. `upcast_op(fn, x, *params)` runs `fn(x, *params)` without autograd, keeps x in its own
dtype and the parameters, and in backward runs `fn` again on them under autograd and differentiates that: the same
ops, so the same outputs and gradients, bit for bit, as autograd through `fn` would give; the price is `fn`'s
forward once more in backward (elementwise work for a norm, one T×D×E GEMM for the router). An fp32 input has no
copy to spare, so `fn` then simply runs under autograd.
"""
from __future__ import annotations

from typing import Callable

import torch


class _UpcastOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn: Callable, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        ctx.fn, ctx.device_type = fn, device_type
        ctx.autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.save_for_backward(x, *params)
        return fn(x, *params)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, *params = ctx.saved_tensors
        enabled, dtype = ctx.autocast
        needs = ctx.needs_input_grad[1:]
        inputs = [t.detach().requires_grad_(need) for t, need in zip((x, *params), needs)]
        with torch.enable_grad(), torch.autocast(ctx.device_type, dtype=dtype, enabled=enabled):
            out = ctx.fn(*inputs)
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad_out) if wanted else ())
        return (None, *(next(grads) if t.requires_grad else None for t in inputs))


def upcast_op(fn: Callable[..., torch.Tensor], x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
    """`fn(x, *params)`, differentiable in x and params; for a reduced-precision x, backward keeps x itself and
    recomputes `fn` rather than keeping the fp32 tensors `fn` makes from it (module docstring)."""
    if x.dtype == torch.float32 or not torch.is_grad_enabled():
        return fn(x, *params)
    return _UpcastOp.apply(fn, x, *params)
