"""`precision=bf16`: bf16 compute end to end over fp32 master weights (`Bf16Converter`).

What runs in which dtype:
- every nn.Linear, nn.Embedding and routed-expert stack (`GroupedExperts`) multiplies with a bf16 copy of its
  weight, so embeddings, projections, attention, experts, the residual stream and the logits are bf16;
- the router's gate (and a noisy router's noise linear) and DeepSeek-V3's expert bias stay fp32 and are used in
  fp32 (`Router` casts its input up), so logits, scores, top-k, gate weights and the balance losses are fp32;
- norms keep fp32 weights, take their statistics in fp32 and return the input's dtype (`train/model/norms.py`);
- the loss is taken in fp32 (`token_cross_entropy`).

Design: the Parameters stay the fp32 masters, as built, so names, state-dict keys, checkpoints, `export_state`,
the optimizer, gradient reduction and clipping see fp32 tensors and need no change (a resume and a reshard stay
exact). The converter swaps module classes (as FP8's does) so that each forward reads `compute_weight(p)`: the
bf16 copy of `p`, cast once and cached on the Parameter until `p` changes (its version counter moves when the
optimizer updates it in place or a checkpoint loads into it): once per optimizer step, shared by every
micro-batch, every use (a tied head) and every activation-checkpointing recompute. Its backward hands the bf16
weight gradient back as fp32, so autograd accumulates the micro-batches' gradients into the fp32 `.grad` of the
master (Megatron's `main_grad`; FSDP2's `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`) and the
engine reduces, clips and steps in fp32 without knowing about bf16.

Chosen over swapping bf16 tensors into the modules (Megatron's `Float16Module`) because a swap must be undone
before anything reads the parameters (engine, checkpoint, planner, tests) and redone inside activation
checkpointing's recompute; the cached cast has no state outside the Parameter. The cost is the same: one bf16
copy of the converted weights held across the step (`train/plan/state.py` counts it).

Under ZeRO (DeepSpeed in its fp32 mode, `parallel/zero/`): `_CachedCast` takes the master as an autograd input, so
the fp32 gradient reaches the Parameter's AccumulateGrad node, where ZeRO's reduce hooks sit; DeepSpeed reduces,
partitions, clips and steps fp32 as at any precision. Two things differ from stage 0:
- ZeRO-1/2 write the updated weights into a flat buffer the Parameters view, which moves neither their storage
  nor their version counter, so the engine advances the version counters after each step (`_mark_updated`);
  without it the copies kept the first step's weights (loss off by 1.7e-3 at the second step, test_zero.py).
- ZeRO-3 gathers `.data` around each module's use and releases it after: the engine marks every Parameter
  `gathered_per_use`, and `compute_weight` casts per use without caching, since a cache would pin a whole bf16
  copy of every weight for the step (the partitioning undone) and save no cast (each gather lands elsewhere).
  Gathers therefore move fp32, 4 bytes per parameter: 26.4 MB per rank and step for tiny_deepseek_moe (13.2 MB of
  local parameters, gathered once per micro-batch, 2 micro-batches; `torchrun --nproc_per_node=4
  scripts/bench_zero.py --steps 2 precision=bf16`). DeepSpeed's `bf16` mode would gather bf16 (half that) but is
  not an option here: it casts every Parameter, the router gate included (`engine.py:1851-1862` in 0.19.8;
  `keep_in_fp32_modules` covers buffers only), and ZeRO-3's flat partitions hold one dtype for all parameters
  (`stage3.py:238, 907`), so an fp32 gate cannot be put back beside bf16 weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from train.model.loss_head import OutputHead
from train.model.moe.experts import GroupedExperts
from train.model.moe.router import Router

COMPUTE_DTYPE = torch.bfloat16


class _CachedCast(torch.autograd.Function):
    """Forward: the cached compute copy of `master` (an alias of it, so the cache is not part of any graph).
    Backward: the gradient in the master's dtype, which autograd accumulates into `master.grad`."""

    @staticmethod
    def forward(ctx, master: torch.Tensor, copy: torch.Tensor) -> torch.Tensor:
        ctx.master_dtype = master.dtype
        return copy.view_as(copy)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.to(ctx.master_dtype), None


def compute_weight(p: torch.Tensor, dtype: torch.dtype = COMPUTE_DTYPE) -> torch.Tensor:
    """The `dtype` copy of the master `p` for this step's forwards, differentiable into `p.grad` (in `p`'s dtype).
    Cast again only when `p` changed since the last cast (its storage or its version counter)."""
    if p.dtype == dtype:
        return p
    if getattr(p, "gathered_per_use", False):  # ZeRO-3: a cache would pin the gathered weight and go stale
        with torch.no_grad():
            copy = p.detach().to(dtype)
        return _CachedCast.apply(p, copy)
    key = (p.data_ptr(), p._version, dtype)
    cached = getattr(p, "_compute_copy", None)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, p.detach().to(dtype))
        p._compute_copy = cached
    return _CachedCast.apply(p, cached[1])


class Bf16Linear(nn.Linear):
    """`nn.Linear` computing with the bf16 copy of its weight (and bias); the Parameters stay fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else compute_weight(self.bias)
        return F.linear(x.to(COMPUTE_DTYPE), compute_weight(self.weight), bias)


class Bf16Embedding(nn.Embedding):
    """`nn.Embedding` looking rows up in the bf16 copy of its table: the residual stream starts in bf16."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, compute_weight(self.weight), self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)


class Bf16GroupedExperts(GroupedExperts):
    """Routed experts whose grouped GEMMs take the bf16 copies of the stacked weights (and bf16 rows)."""

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        return compute_weight(self.w_gate_up_EHD), compute_weight(self.w_down_EDF)

    def forward(self, x_ND: torch.Tensor, num_tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        return super().forward(x_ND.to(COMPUTE_DTYPE), num_tokens_per_expert_E)


class Bf16OutputHead(OutputHead):
    """The output head (logits, or the chunked loss) on the bf16 copy of its weight (the embedding's when tied:
    the same cached copy) and bf16 hidden states; the loss itself is still taken in fp32."""

    def head_weight(self) -> torch.Tensor:
        return compute_weight(self.weight)

    def forward(self, h_BTD: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return super().forward(h_BTD.to(COMPUTE_DTYPE), *args, **kwargs)


SWAPS = ((nn.Linear, Bf16Linear), (nn.Embedding, Bf16Embedding), (GroupedExperts, Bf16GroupedExperts),
         (OutputHead, Bf16OutputHead))


class Bf16Converter:
    """The model converter of `precision=bf16` (the build pipeline's step 2): swaps the class of every linear,
    embedding and expert stack outside the routers, keeping each Parameter (fp32) in place. Routers and norms
    are left as they are: they compute in fp32 on fp32 weights."""

    def convert(self, model: nn.Module) -> str:
        keep = {id(m) for r in model.modules() if isinstance(r, Router) for m in r.modules()}
        counts: dict[str, int] = {}
        for module in model.modules():
            if id(module) in keep:
                continue
            for base, swap in SWAPS:
                if type(module) is base:
                    module.__class__ = swap
                    counts[base.__name__] = counts.get(base.__name__, 0) + 1
        done = ", ".join(f"{n} {name}" for name, n in counts.items())
        return f"bf16 compute: {done} on bf16 copies of fp32 masters; routers and norms fp32"


def compute_copy_numel(model: nn.Module) -> int:
    """Elements of the bf16 compute copies a converted `model` holds across a step (each tied Parameter once):
    what `precision=bf16` adds to the fp32 masters (`train/plan`). 0 for an unconverted model."""
    seen: dict[int, int] = {}
    for module in model.modules():
        if isinstance(module, (Bf16Linear, Bf16Embedding, Bf16GroupedExperts, Bf16OutputHead)):
            for p in module.parameters(recurse=False):
                seen[id(p)] = p.numel()
    return sum(seen.values())
