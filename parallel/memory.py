"""Bytes of tensors a rank holds, counted once each: what the engines' `held_bytes()` report and the ZeRO memory
test asserts. A tensor is identified by (address, size), so views of one buffer listed twice count once."""
from __future__ import annotations

from typing import Iterable, Iterator

import torch


def tensors_in(obj, depth: int = 3) -> Iterator[torch.Tensor]:
    """Every tensor in `obj`, looking into dicts, lists and tuples up to `depth` levels."""
    if torch.is_tensor(obj):
        yield obj
    elif depth > 0 and isinstance(obj, dict):
        for value in obj.values():
            yield from tensors_in(value, depth - 1)
    elif depth > 0 and isinstance(obj, (list, tuple)):
        for value in obj:
            yield from tensors_in(value, depth - 1)


def unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Σ bytes over distinct non-empty tensors (scalars such as Adam's step count included)."""
    seen = set()
    total = 0
    for t in tensors:
        key = (t.data_ptr(), t.numel(), t.dtype)
        if t.numel() and key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total
