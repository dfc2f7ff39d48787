"""`apply_activation_checkpointing(model, mode)`: trade backward compute for activation memory, in place.

`trainer.activation_checkpointing` picks the mode:

- `none`: autograd keeps every tensor the backward needs.
- `full`: every transformer block (the main blocks and each MTP module's block) keeps only its input; its whole
  forward runs again in backward: norms, attention, router, the dispatch all-to-alls, the expert GEMMs, combine.
- `selective`: recomputes only cheap ops, never a collective, a routing decision or a projection GEMM.
    recomputed: in `Block.token_mixing`, attn_norm, RoPE, the attention core (scores, masks, softmax/SDPA), the
      residual add and ffn_norm; in the routed experts, the shared experts and the dense FFNs, the SwiGLU
      activation `silu(x W_gate) * (x W_up)`.
    kept: the output of every `mm`/`addmm`/`_grouped_mm` in those regions (q/k/v/o and MLA's low-rank
      projections, the expert, shared-expert and dense FFN gate/up/down GEMMs; o_proj's output too, which no
      backward op needs: a policy sees ops, not their consumers), and everything of the MoE sublayer outside
      its experts, which is not wrapped at all: the router's logits, scores and top-k, capacity drops, the
      dispatched rows and all-to-all results, the combine's gate weights and the balance terms' inputs.
    The MoE sublayer's routing and communication never run twice, so `selective` has none of the hazards below.

Hazards of recomputing a whole MoE block (`full`), and how each is handled:
- the all-to-all dispatcher runs again in backward (`exchange_counts` and the token all-to-all), collective over
  the EP group. Every rank's backward graph has the same structure, so every rank recomputes the same blocks
  in the same order and the collectives match (`tests/distributed/test_expert_parallel.py` checks `full`'s
  gradients against expert parallelism without checkpointing);
- `count_reducer` (an all-reduce over the world) is not run again: the first forward records its result and the
  recompute replays it, after checking that the recomputed local counts equal the recorded ones (a routing
  that changed between forward and recompute is an error, not silently different gradients);
- the expert-bias load (`MoELayer.expert_load_E`, DeepSeek-V3's bias update input) is counted in the first
  forward only (`MoELayer.count_load` is off during the recompute);
- routing statistics come from the first forward's outputs; the recompute's outputs are discarded;
- RNG (router noise or jitter): `checkpoint` restores the forward's CPU and device RNG states for the recompute.

Document masking's `document_ids_BT` (and the per-row positions) reach the wrapped methods as ordinary tensor
arguments, saved as inputs: the recompute rebuilds the same mask from them, and `selective` recomputes the mask
rather than keeping it (it comes from comparisons, not a kept GEMM).

Bypassed, so nothing changes there: forwards without autograd (evaluation under `torch.no_grad`, generation)
and any call that passes a `KVCache` (a recompute would append the keys and values a second time).

Each wrapped method is replaced by an instance attribute (`module.forward`, `block.token_mixing`), so parameter
names, state-dict keys and module hooks are untouched. Non-reentrant `torch.utils.checkpoint` throughout
(it allows outputs that are not tensors, such as `MoELayerOutput`, and nested autograd). `selective` uses a
`create_selective_checkpoint_contexts` policy because it can keep a GEMM's output while recomputing the cheap
ops around it inside one region, which region boundaries alone cannot express. Checked by hand beyond the
tests: the same gradients under `trainer.compile=true` (Dynamo falls back to eager at the MoE layer's host
syncs) and the same losses and weights as stage 0 under ZeRO-3 (4 ranks, ep_size 2).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from train.model.attention import KVCache
from train.model.mlp import SwiGLU
from train.model.moe.experts import GroupedExperts
from train.model.moe.layer import MoELayer

MODES = ("none", "full", "selective")

# The matmuls whose outputs `selective` keeps (nn.Linear lowers to mm/addmm, grouped experts to _grouped_mm, the
# experts' fallback loop to mm). bmm is deliberately absent: SDPA's math path uses it for scores and the
# weighted sum, which are recomputed.
# precision=fp8 adds torchao's scaled GEMMs (its emulated kernels dequantise and use mm).
_KEPT_OPS = frozenset({torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten._grouped_mm.default,
                       torch.ops.aten._scaled_mm.default,
                       *([torch.ops.aten._scaled_grouped_mm.default] if hasattr(torch.ops.aten, "_scaled_grouped_mm")
                         else [])})


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _keep_matmuls_contexts():
    return create_selective_checkpoint_contexts(_keep_matmuls)


class _Reenterable:
    """A context manager that can be entered again after it exits: each entry enters a fresh `factory()`."""

    def __init__(self, factory: Callable):
        self.factory, self.entered = factory, []

    def __enter__(self):
        cm = self.factory()
        self.entered.append(cm)
        return cm.__enter__()

    def __exit__(self, *exc):
        return self.entered.pop().__exit__(*exc)


class _MoERecomputeGuard:
    """`context_fn` contexts for one checkpointed call of a region holding MoE layers: the first forward records
    every `count_reducer` result; the recompute replays them in order and does not count expert loads again."""

    def __init__(self, layers: list[MoELayer]):
        self.layers = layers
        self.recorded: list[tuple[torch.Tensor, torch.Tensor]] = []

    @contextlib.contextmanager
    def _swapped(self, reducer_for: Callable, count_load: Optional[bool]):
        saved = [(layer.count_reducer, layer.count_load) for layer in self.layers]
        for layer in self.layers:
            layer.count_reducer = reducer_for(layer.count_reducer)
            if count_load is not None:
                layer.count_load = count_load
        try:
            yield
        finally:
            for layer, (reducer, count) in zip(self.layers, saved):
                layer.count_reducer, layer.count_load = reducer, count

    def first_forward(self):
        def recording(reduce):
            def run(local: torch.Tensor) -> torch.Tensor:
                out = reduce(local)
                self.recorded.append((local, out))
                return out
            return run

        return self._swapped(recording, None)

    def recompute(self):
        """The recompute's context; entered once per recomputation (a zero-bubble pipeline recomputes a region
        twice: for the input gradients, then for the weight gradients), each time replaying from the start."""
        def swapped():
            replay = iter(self.recorded)

            def replaying(_reduce):
                def run(local: torch.Tensor) -> torch.Tensor:
                    recorded_local, out = next(replay)
                    if not torch.equal(local, recorded_local):
                        raise RuntimeError(
                            "activation checkpointing: the recomputed forward routed tokens differently from the "
                            "first one (different expert counts); the backward would not match the forward. Make "
                            "the forward deterministic or use trainer.activation_checkpointing=selective")
                    return out
                return run

            return self._swapped(replaying, False)

        return _Reenterable(swapped)

    def contexts(self):
        return self.first_forward(), self.recompute()


def _moe_guard_contexts(block: nn.Module) -> Callable:
    layers = [m for m in block.modules() if isinstance(m, MoELayer)]
    if not layers:
        return lambda: (contextlib.nullcontext(), contextlib.nullcontext())
    return lambda: _MoERecomputeGuard(layers).contexts()


class _Checkpointed:
    """Stands in for `module.<name>`: runs the class's method under non-reentrant `checkpoint` when autograd is
    recording and no `KVCache` is passed, and plainly otherwise. A callable object rather than a closure so
    that `copy.deepcopy(model)` copies it along with its module."""

    def __init__(self, module: nn.Module, name: str, context_fn: Callable):
        self.module, self.name, self.context_fn = module, name, context_fn

    def __call__(self, *args, **kwargs):
        method = getattr(type(self.module), self.name).__get__(self.module)
        if not torch.is_grad_enabled() or any(isinstance(a, KVCache) for a in (*args, *kwargs.values())):
            return method(*args, **kwargs)
        return checkpoint(method, *args, use_reentrant=False, context_fn=self.context_fn, **kwargs)


def _wrap(module: nn.Module, name: str, context_fn: Callable) -> None:
    if isinstance(module.__dict__.get(name), _Checkpointed):
        raise RuntimeError(f"activation checkpointing is already applied to {type(module).__name__}.{name}")
    setattr(module, name, _Checkpointed(module, name, context_fn))


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Wrap `model`'s blocks in place for `mode` (`none`, `full` or `selective`; see the module docstring for
    what each recomputes). `model` is a `MoETransformer`, already expert-parallel or not: the wrappers call
    whatever dispatcher and `count_reducer` the MoE layers hold. Same on every rank; no communication here."""
    if mode not in MODES:
        raise ValueError(f"trainer.activation_checkpointing={mode!r} is not valid: choose one of {', '.join(MODES)}")
    if mode == "none":
        return
    if not hasattr(model, "blocks"):
        raise TypeError(f"activation checkpointing expects a model with blocks() (MoETransformer), got "
                        f"{type(model).__name__}")
    for block in model.blocks():
        if mode == "full":
            _wrap(block, "forward", _moe_guard_contexts(block))
            continue
        _wrap(block, "token_mixing", _keep_matmuls_contexts)
        for module in block.ffn.modules():
            if isinstance(module, (GroupedExperts, SwiGLU)):
                _wrap(module, "forward", _keep_matmuls_contexts)
