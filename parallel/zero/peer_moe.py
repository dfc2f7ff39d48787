"""DeepSpeed's own MoE layer as a peer for `scripts/bench_moe.py`, loaded with given weights: the one place outside
the ZeRO glue that reaches into DeepSpeed's MoE internals (`deepspeed_moe.gate.wg`, `experts.deepspeed_experts`),
so it sits here, behind `runtime.import_deepspeed` and the version the glue is pinned to (`DEEPSPEED_VERSION`)."""
from __future__ import annotations

import os

import torch
from torch import nn

from parallel.zero.runtime import import_deepspeed


def init_deepspeed_comm() -> None:
    """DeepSpeed's communication on the already initialised default process group (gloo)."""
    deepspeed = import_deepspeed()
    os.environ.setdefault("LOCAL_RANK", "0")
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)


def deepspeed_moe(d_model: int, expert: nn.Module, num_experts: int, top_k: int, router_ED: torch.Tensor,
                  expert_weights: list[dict[str, torch.Tensor]]) -> nn.Module:
    """`deepspeed.moe.layer.MoE` at ep_size 1 without token dropping (capacity = E), its router weight set to
    `router_ED` and expert e's parameters (named as in `expert`) to `expert_weights[e]`. One process only."""
    import_deepspeed()
    from deepspeed.moe.layer import MoE

    moe = MoE(d_model, expert, num_experts=num_experts, ep_size=1, k=top_k, capacity_factor=float(num_experts),
              eval_capacity_factor=float(num_experts), min_capacity=0, drop_tokens=False, use_rts=False,
              top2_2nd_expert_sampling=False)
    moe.set_deepspeed_parallelism()
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight.copy_(router_ED)
        for ex, weights in zip(moe.deepspeed_moe.experts.deepspeed_experts, expert_weights):
            params = dict(ex.named_parameters())
            for name, value in weights.items():
                params[name].copy_(value)
    return moe
