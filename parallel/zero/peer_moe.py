"""DeepSpeed's own MoE layer as a peer for the benchmarks (`scripts/bench_moe.py` in one process,
`scripts/bench_ep.py` with expert parallelism), loaded with given weights: the one place outside the ZeRO glue that
reaches into DeepSpeed's MoE internals (`deepspeed_moe.gate.wg`, `deepspeed_moe.ep_group`,
`experts.deepspeed_experts`), so it sits here, behind `runtime.import_deepspeed` and the version the glue is pinned
to (`DEEPSPEED_VERSION`)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from parallel.zero.runtime import import_deepspeed


def init_deepspeed_comm(backend: str = "gloo") -> None:
    """DeepSpeed's communication on the already initialised default process group (gloo, or nccl on GPUs)."""
    deepspeed = import_deepspeed()
    os.environ.setdefault("LOCAL_RANK", "0")
    deepspeed.init_distributed(dist_backend=backend, verbose=False)


def deepspeed_moe(d_model: int, expert: nn.Module, num_experts: int, top_k: int, router_ED: torch.Tensor,
                  expert_weights: list[dict[str, torch.Tensor]], ep_size: int = 1,
                  dtype: torch.dtype = torch.float32) -> nn.Module:
    """`deepspeed.moe.layer.MoE` without token dropping (capacity = the busiest expert's count, the maximum over
    the EP group), its router weight set to `router_ED` and each of its experts' parameters (named as in `expert`)
    to `expert_weights[e]` for the global expert id e it holds.

    ep_size 1: one process holds all E experts. ep_size > 1 (collective over the world: call after
    `init_deepspeed_comm` on every rank): DeepSpeed's expert-parallel groups (`set_deepspeed_parallelism`: world
    ranks [g·ep, (g+1)·ep), as `parallel.mesh` lays out ours) are created, and the rank at position p of its group
    holds experts [p·E/ep, (p+1)·E/ep), the block its (E, C, D) all-to-all sends to position p. `expert_weights`
    lists all E experts on every rank; each rank copies its own block. Top-k: DeepSpeed's gate runs softmax over all
    E, keeps the k largest and renormalises them (k = 2 without the sampled second expert, k > 2 `topkgating`),
    Mixtral's math. `dtype`: the experts' weights (bf16 for a bf16 benchmark); the gate's weight stays fp32, as our
    router's does (DeepSpeed's gate computes its logits in fp32 either way)."""
    import_deepspeed()
    from deepspeed.moe.layer import MoE

    moe = MoE(d_model, expert, num_experts=num_experts, ep_size=ep_size, k=top_k,
              capacity_factor=float(num_experts), eval_capacity_factor=float(num_experts), min_capacity=0,
              drop_tokens=False, use_rts=False, top2_2nd_expert_sampling=False)
    moe.set_deepspeed_parallelism()
    moe.to(dtype)
    moe.deepspeed_moe.gate.wg.float()
    num_local = num_experts // ep_size
    first = dist.get_rank(group=moe.deepspeed_moe.ep_group) * num_local if ep_size > 1 else 0
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight.copy_(router_ED)
        local = moe.deepspeed_moe.experts.deepspeed_experts
        for ex, weights in zip(local, expert_weights[first : first + num_local], strict=True):
            params = dict(ex.named_parameters())
            for name, value in weights.items():
                params[name].copy_(value)
    return moe

