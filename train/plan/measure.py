"""Measure what the planner predicts, on a real (small) model in one process: the bytes autograd saves for
backward, counted with saved-tensor hooks. The planner's activation figures are checked against this."""
from __future__ import annotations

import contextlib

import torch
from torch import nn


def saved_tensor_bytes(model: nn.Module, input_ids_BT: torch.Tensor, labels_BT: torch.Tensor,
                       autocast_dtype: torch.dtype | None = None) -> int:
    """Bytes of the distinct storages autograd saves during one training forward pass of `model` (loss included),
    parameters and buffers excluded. Each storage counts once, whole, however many saved views point into it; a
    storage that is saved stays alive until backward, so no address is reused within the pass."""
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}
    alive = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in own and storage.nbytes():
            seen.setdefault(ptr, storage.nbytes())
        alive.append(t)
        return t

    autocast = (torch.autocast(device_type=input_ids_BT.device.type, dtype=autocast_dtype)
                if autocast_dtype is not None else contextlib.nullcontext())
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        out = model(input_ids_BT, labels_BT)
    del out
    alive.clear()  # the saved tensors go with the graph
    return sum(seen.values())
