"""Construction in shards, measured against the memory planner: what each rank allocates.

    torchrun --standalone --nproc_per_node=4 scripts/bench_construction.py model=deepseek_v3 parallel.ep_size=4 \\
        model.num_layers=1 model.moe.first_k_dense=0 model.mtp_depth=0 model.moe.num_experts=32 \\
        model.moe.num_groups=8 model.vocab_size=8192

Each rank builds the model the trainer's way (`train.build.build_model` up to materialisation, which allocates
and initialises only what the rank owns) and reports: the bytes of the parameters it holds, the planner's
`params_bytes` for the layout (`python -m train.plan`), the bytes the whole model would need, and the growth of
the process's peak resident memory (ru_maxrss) over the construction. Last line: JSON (every rank's figures).
"""
from __future__ import annotations

import json
import resource
import sys
import time

import torch



def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main(argv=None) -> None:
    import parallel
    from parallel.memory import unique_bytes
    from train.config import load_train_config
    from train.build import build_model, meta_model
    from train.model.transformer import draw_init_seed
    from train.plan.planner import plan_memory

    cfg = load_train_config(["trainer.device=cpu", *(sys.argv[1:] if argv is None else argv)])
    mesh = parallel.init_distributed(cfg)
    whole = sum(p.numel() * 4 for p in meta_model(cfg.model).parameters())
    torch.manual_seed(0)
    before, t0 = _rss(), time.perf_counter()
    model = build_model(cfg, mesh, init_seed=draw_init_seed(), stop_after="load").model
    seconds = time.perf_counter() - t0
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    mine = {"rank": mesh.rank, "params_bytes": unique_bytes(model.parameters()), "peak_rss_growth_bytes": growth,
            "seconds": round(seconds, 2)}
    everyone = parallel.gather_objects(mine, mesh)
    if mesh.rank == 0:
        planned = plan_memory(cfg, mesh.world_size)["params_bytes"]
        for r in everyone:
            print(f"rank {r['rank']}: holds {r['params_bytes'] / 2**30:.3f} GiB of parameters (planned "
                  f"{planned / 2**30:.3f}), peak RSS grew {r['peak_rss_growth_bytes'] / 2**30:.3f} GiB in "
                  f"{r['seconds']} s; the whole model is {whole / 2**30:.3f} GiB")
        print(json.dumps({"model": cfg.model.name, "world_size": mesh.world_size, "ep_size": mesh.ep_size,
                          "whole_model_bytes": whole, "planned_params_bytes": planned, "ranks": everyone}))
    parallel.shutdown(mesh)

