"""Benchmark the expert-parallel token dispatcher: bytes moved per token (deduplicated vs one copy per
selected expert) and dispatch / combine wall time, for ep_size ∈ {2, 4} and device limit M ∈ {1, 2, None}.

    python scripts/bench_dispatch.py [--backend gloo|nccl] [--dtype fp32|bf16] [--a2a-dtype auto|fp8]
                                     [--tokens 2048] [--d-model 512] [--experts 16] [--top-k 4] [--iters 10]

Spawns ep_size ranks per setting (gloo on CPU; nccl puts rank r on cuda:r). Routing is random but
device-limited like the real router (a token picks its top-M devices by best expert score, then its top-k
experts among them). Bytes are what really crosses the wire, per token of the global batch, counting only copies
that leave their rank: dispatch = the packed row (token row in `--dtype`, or e4m3 + tile scales with
`--a2a-dtype fp8`, gate weights, expert ids), combine = one row in `--dtype`. `..._naive` sends one copy per
selected expert; `combine_bytes_per_token_weights_home` is what the combine would return if the gate weights
stayed on the token's rank (each expert's output separately). Prints one line per setting; the last line is JSON
with the first setting's `dispatch_bytes_per_token`, `combine_bytes_per_token`, `bytes_per_token` and every
result.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from parallel.comm import wire_bytes_per_row
from parallel.permute import copy_weights, plan_send
from parallel.ports import free_port

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _routing(args, ep_size, limit, rank):
    from train.model.moe.router import group_limited_mask

    g = torch.Generator().manual_seed(1000 + rank)
    scores_TE = torch.rand(args.tokens, args.experts, generator=g)
    if limit is not None and limit < ep_size:
        scores_TE = scores_TE.masked_fill(~group_limited_mask(scores_TE, ep_size, limit, "max"), float("-inf"))
    w_TK, ids_TK = scores_TE.topk(args.top_k, dim=-1)
    return ids_TK, w_TK.softmax(-1)


def _worker(rank, args, ep_size, port, out_path):
    from parallel.dispatcher import AllToAllDispatcher
    from train.model.moe.placement import ExpertPlacement

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // ep_size))
    device = torch.device("cuda", rank) if args.backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(args.backend, rank=rank, world_size=ep_size)
    group = dist.new_group(list(range(ep_size)))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dtype = DTYPES[args.dtype]
    results = []
    for limit in (1, 2, None):
        if limit is not None and limit > ep_size:
            continue
        disp = AllToAllDispatcher(group, ExpertPlacement(args.experts, ep_size, rank), fp8=args.a2a_dtype == "fp8")
        ids_TK, w_TK = _routing(args, ep_size, limit, rank)
        ids_TK, w_TK = ids_TK.to(device), w_TK.to(device)
        x_TD = torch.randn(args.tokens, args.d_model, device=device, dtype=dtype)
        t_disp = t_comb = 0.0
        for it in range(args.warmup + args.iters):
            dist.barrier(group)
            sync()
            t0 = time.perf_counter()
            x_ND, _ = disp.dispatch(x_TD, ids_TK, w_TK)
            sync()
            t1 = time.perf_counter()
            disp.combine(x_ND)  # identity "experts": the timing is the exchange and the bookkeeping
            sync()
            t2 = time.perf_counter()
            if it >= args.warmup:
                t_disp, t_comb = t_disp + t1 - t0, t_comb + t2 - t1
        st = disp.stats
        plan = plan_send(ids_TK, disp.placement)
        dispatch_row = wire_bytes_per_row([x_TD, copy_weights(w_TK, plan), plan.local_ids_CK],
                                          fp8_rows=args.a2a_dtype == "fp8")
        combine_row = args.d_model * x_TD.element_size()
        local = torch.tensor([float(st["a2a_tokens_sent"]), float(st["a2a_tokens_sent_naive"]),
                              float(st["devices_per_token_mean"]), t_disp / args.iters, t_comb / args.iters],
                             dtype=torch.float64)
        summed = local.clone()
        dist.all_reduce(summed, group=group)
        slowest = local.clone()
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
        tokens = args.tokens * ep_size
        copies, naive = summed[0].item() / tokens, summed[1].item() / tokens  # per token, leaving their rank
        results.append({
            "ep_size": ep_size, "device_limit": limit,
            "dispatch_bytes_per_token": dispatch_row * copies,
            "combine_bytes_per_token": combine_row * copies,
            "bytes_per_token": (dispatch_row + combine_row) * copies,
            "bytes_per_token_naive": (dispatch_row + combine_row) * naive,
            "combine_bytes_per_token_weights_home": combine_row * naive,
            "devices_per_token_mean": summed[2].item() / ep_size,
            "dispatch_ms": 1e3 * slowest[3].item(), "combine_ms": 1e3 * slowest[4].item(),
        })
    if rank == 0:
        Path(out_path).write_text(json.dumps(results))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="token rows' compute dtype")
    p.add_argument("--a2a-dtype", default="auto", choices=["auto", "fp8"],
                   help="what the dispatch sends rows as (parallel.a2a_dtype)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--ep-sizes", type=int, nargs="+", default=[2, 4])
    args = p.parse_args()

    all_results = []
    for ep_size in args.ep_sizes:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "result.json")
            mp.start_processes(_worker, args=(args, ep_size, free_port(), out), nprocs=ep_size, join=True,
                               start_method="spawn")
            all_results += json.loads(Path(out).read_text())
    for r in all_results:
        saved = 1 - r["bytes_per_token"] / max(r["bytes_per_token_naive"], 1e-9)
        print(f"ep={r['ep_size']} M={r['device_limit']}: {r['bytes_per_token']:.0f} B/token "
              f"(dispatch {r['dispatch_bytes_per_token']:.0f} + combine {r['combine_bytes_per_token']:.0f}) "
              f"deduplicated vs {r['bytes_per_token_naive']:.0f} naive ({100 * saved:.0f}% saved); combine with "
              f"the gate weights home {r['combine_bytes_per_token_weights_home']:.0f}; "
              f"{r['devices_per_token_mean']:.2f} devices/token, dispatch {r['dispatch_ms']:.2f} ms, "
              f"combine {r['combine_ms']:.2f} ms")
    first = all_results[0]
    print(json.dumps({"backend": args.backend, "tokens_per_rank": args.tokens, "d_model": args.d_model,
                      "experts": args.experts, "top_k": args.top_k, "dtype": args.dtype,
                      "a2a_dtype": args.a2a_dtype,
                      **{k: first[k] for k in ("dispatch_bytes_per_token", "combine_bytes_per_token",
                                               "bytes_per_token")},
                      "results": all_results}))
