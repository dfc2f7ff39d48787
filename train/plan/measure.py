"""Measure what the planner predicts, on a real (small) model in one process, each storage counted once, whole,
parameters and buffers left out:
  - `saved_tensor_bytes`: what autograd saves for backward (saved-tensor hooks), the activations of `none` and
    `full` (a checkpointed region's inputs are packed outside it);
  - `alive_tensor_bytes`: what the forward leaves alive while only its output is held, whoever holds it; the
    memory figure for `selective`, whose kept matmul outputs sit in the selective-checkpoint cache, which the
    hooks never see (in the other modes it equals the saved bytes);
  - `recompute_peak_bytes`: the most that backward's recomputation holds at one time, the planner's transient.
The planner's activation figures are checked against these (tests/unit/test_plan.py)."""
from __future__ import annotations

import contextlib
import weakref

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _autocast(input_ids_BT: torch.Tensor, dtype: torch.dtype | None):
    return torch.autocast(device_type=input_ids_BT.device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def _weights(model: nn.Module) -> dict[int, StorageWeakRef]:
    """Storages of the parameters, buffers and the parameters' cached bf16 compute copies (`precision=bf16`, held
    for the whole step: state, not activations; cast before the pass by calling the model once)."""
    copies = [p._compute_copy[1] for p in model.parameters() if hasattr(p, "_compute_copy")]
    return {t.untyped_storage().data_ptr(): StorageWeakRef(t.untyped_storage())
            for t in (*model.parameters(), *model.buffers(), *copies)}


def _out_storages(out):
    return [t.untyped_storage() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def saved_tensor_bytes(model: nn.Module, input_ids_BT: torch.Tensor, labels_BT: torch.Tensor,
                       autocast_dtype: torch.dtype | None = None) -> int:
    """Bytes of the distinct storages autograd saves during one training forward pass of `model` (loss included),
    parameters and buffers excluded. Each storage counts once, whole, however many saved views point into it; a
    storage that is saved stays alive until backward, so no address is reused within the pass."""
    own = set(_weights(model))
    seen: dict[int, int] = {}
    alive = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in own and storage.nbytes():
            seen.setdefault(ptr, storage.nbytes())
        alive.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _autocast(input_ids_BT, autocast_dtype):
        out = model(input_ids_BT, labels_BT)
    del out
    alive.clear()  # the saved tensors go with the graph
    return sum(seen.values())


class _NewStorages(TorchDispatchMode):
    """Weak references to the storage of every tensor an op creates (views included: they name their base)."""

    def __init__(self):
        super().__init__()
        self.refs: list[tuple[int, StorageWeakRef, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.refs += [(s.data_ptr(), StorageWeakRef(s), s.nbytes()) for s in _out_storages(out)]
        return out

    def alive(self) -> dict[int, tuple[StorageWeakRef, int]]:
        """Address -> (reference, bytes) of the storages still alive (one live storage per address)."""
        return {ptr: (ref, n) for ptr, ref, n in self.refs if not ref.expired()}


def _forward(model, input_ids_BT, labels_BT, autocast_dtype):
    """One training forward under `_NewStorages`: (loss, storages created and still alive, weights excluded)."""
    weights = _weights(model)
    with _NewStorages() as created, _autocast(input_ids_BT, autocast_dtype):
        loss = model(input_ids_BT, labels_BT).loss
    alive = {ptr: v for ptr, v in created.alive().items() if ptr not in weights}
    return loss, alive, weights


def alive_tensor_bytes(model: nn.Module, input_ids_BT: torch.Tensor, labels_BT: torch.Tensor,
                       autocast_dtype: torch.dtype | None = None) -> int:
    """Bytes of the distinct storages that one training forward creates and that are still alive once it returns
    and only the loss is held (autocast's weight-cast cache already dropped): everything the backward will use,
    held by autograd or by a checkpoint's cache."""
    loss, alive, _ = _forward(model, input_ids_BT, labels_BT, autocast_dtype)
    return sum(n for _, n in alive.values())


class _RecomputedStorages(TorchDispatchMode):
    """During backward: the peak bytes of new storages created by ops that run with autograd recording, i.e. by a
    checkpoint's recomputed forward (the backward's own ops, gradients among them, run without it)."""

    def __init__(self, before: dict[int, tuple[StorageWeakRef, int]]):
        super().__init__()
        self.before, self.live, self.peak = before, {}, 0

    def _new(self, storage) -> bool:
        ptr = storage.data_ptr()
        if ptr in self.before and not self.before[ptr][0].expired():
            return False  # a storage the forward left, or a weight: an address names one live storage at a time
        return ptr not in self.live and storage.nbytes() > 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if torch.is_grad_enabled():
            self.live = {ptr: v for ptr, v in self.live.items() if not v[0].expired()}
            for s in filter(self._new, _out_storages(out)):
                self.live[s.data_ptr()] = (StorageWeakRef(s), s.nbytes())
            self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def recompute_peak_bytes(model: nn.Module, input_ids_BT: torch.Tensor, labels_BT: torch.Tensor,
                         autocast_dtype: torch.dtype | None = None) -> int:
    """The most bytes that backward's recomputation holds at one time, over one training step's backward: the
    tensors a recomputed region saves again, until backward consumes them, and its intermediates while it runs.
    0 without checkpointing."""
    loss, alive, weights = _forward(model, input_ids_BT, labels_BT, autocast_dtype)
    before = {**alive, **{ptr: (ref, 0) for ptr, ref in weights.items()}}
    with _RecomputedStorages(before) as recomputed:
        loss.backward()
    return recomputed.peak


class _PeakStorages(TorchDispatchMode):
    """The peak bytes of storages created by the ops run under it (not views or in-place results of their
    inputs), alive at one time."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {s.data_ptr() for s in _out_storages((args, kwargs))}
        self.live = {ptr: v for ptr, v in self.live.items() if not v[0].expired()}
        for s in _out_storages(out):
            ptr = s.data_ptr()
            if ptr not in inputs and ptr not in self.live and s.nbytes():
                self.live[ptr] = (StorageWeakRef(s), s.nbytes())
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def peak_new_bytes(fn) -> tuple[object, int]:
    """(fn(), the most bytes of storages that fn's ops created and held at one time): the working set of a forward
    and backward on CPU, where no allocator statistic exists. Storages alive before the call are not counted."""
    with _PeakStorages() as peak:
        result = fn()
    return result, peak.peak


class _Saved:
    """What a pack hook hands autograd in place of a saved tensor: autograd holds it exactly as long as it holds
    the saved tensor, so its finalizer marks the release."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class LiveSavedPeak:
    """Context manager: the most bytes that autograd holds for backward at one time while it is open (`peak`),
    each storage counted once, whole, from the first saved tensor that points into it until autograd has released
    every one of them (the pack hook wraps each saved tensor in a `_Saved` whose finalizer counts the release, so
    a storage that lives on elsewhere, such as a pipeline's receive buffer, drops out all the same). `exclude`:
    storages never counted (the parameters). `hold(t)` counts `t`'s storage from now until `t` itself is
    collected: a tensor that backward needs but that no autograd node saves (a pipeline chunk's output, which
    the schedule keeps until that chunk's backward). `tag` labels what is packed (`by_tag` at the peak)."""

    def __init__(self, exclude: set[int] = frozenset()):
        self.exclude = set(exclude)
        self.refs: dict[int, int] = {}  # storage address -> saved tensors (or held ones) still holding it
        self.nbytes: dict[int, int] = {}
        self.tags: dict[int, object] = {}
        self.live = self.peak = 0
        self.tag = None
        self.by_tag: dict = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    def _add(self, t: torch.Tensor, holder) -> bool:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.exclude or not storage.nbytes():
            return False
        if ptr not in self.refs:
            self.refs[ptr], self.nbytes[ptr], self.tags[ptr] = 0, storage.nbytes(), self.tag
            self.live += storage.nbytes()
        self.refs[ptr] += 1
        weakref.finalize(holder, self._release, ptr)
        if self.live > self.peak:
            self.peak = self.live
            self.by_tag = {}
            for p, n in self.nbytes.items():
                self.by_tag[self.tags[p]] = self.by_tag.get(self.tags[p], 0) + n
        return True

    def _release(self, ptr: int) -> None:
        self.refs[ptr] -= 1
        if not self.refs[ptr]:
            del self.refs[ptr], self.tags[ptr]
            self.live -= self.nbytes.pop(ptr)

    def _pack(self, t: torch.Tensor):
        # a detached alias: the saved tensor may be the node's own output, whose grad_fn is that node; holding it
        # whole would make a cycle (node -> saved -> tensor -> node) that autograd, which stores outputs without
        # their grad_fn, never makes, and a graph only partly consumed (a zero-bubble weight pass) would never go
        holder = _Saved(t.detach())
        return holder if self._add(t, holder) else t

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _Saved) else packed

    def hold(self, t: torch.Tensor) -> None:
        self._add(t, t)
