"""Expert-parallel MoE layer, forward + backward: ours (`AllToAllDispatcher`, overlap on and off, optionally FP8
dispatch) against DeepSpeed's `deepspeed.moe.layer.MoE` at the same `ep_size`, on the same weights and tokens.

    torchrun --standalone --nproc_per_node=4 scripts/bench_ep.py [--tokens 512] [--d-model 256] [--experts 8]
        [--hidden 512] [--top-k 2] [--shared-hidden 512] [--ep-size WORLD] [--dtype bf16|fp32] [--iters 20]
        [--warmup 3] [--no-fp8] [--threads N] [--device cpu|cuda]

`--device cuda` puts local rank r on cuda:r and communicates over NCCL (`scripts/gpu_check.sh` runs it so);
the default is gloo ranks on the CPU.

Every rank holds `--tokens` tokens of its own (the global batch is tokens × world) and builds, from one seeded
draw of the logical weights (`bench_moe.draw_weights`, identical on every rank):
- ours: `MoELayer` from tiny_mixtral with the shapes as overrides (Mixtral routing: top-k logits, softmax over
  them), `--shared-hidden` / `--hidden` fused shared experts, expert parallelism applied by `parallel.parallelize`
  (the rank keeps its E/ep experts). Variants: `parallel.overlap=true` (`ours_ms`: the shared expert computes while
  the combine is on the wire), `false` (`ours_ms_no_overlap`), and `parallel.a2a_dtype=fp8` with overlap
  (`ours_fp8_ms`, `ours_fp8_bytes_per_token`, `ours_fp8_max_abs_diff`).
- deepspeed: `deepspeed.moe.layer.MoE` (`parallel/zero/peer_moe.py`) with ep_size and its own expert-parallel
  groups (the same contiguous ranks as ours), our `SwiGLU` as the expert, each rank's block of experts loaded,
  dropless (`drop_tokens=False`: capacity C = the busiest expert's count over the EP group), no sampled second
  expert; its gate (softmax over E, top-k, renormalised; `topkgating` for k > 2) is Mixtral's math. The shared
  expert: the same SwiGLU (same weights) added to its output, computed after the MoE returns. DeepSpeed's own
  `use_residual` (PR-MoE) does not fit: it mixes the MoE and a dense MLP of the expert's width with a learned
  softmax coefficient, `coef₀·moe + coef₁·mlp`, not a plain sum, so it could not hold the same weights and
  give the same output; it too runs the MLP after the MoE, so the placement matches what DeepSpeed would do.
`--dtype bf16`: weights and input in bf16 (no autocast), both routers' weights fp32 (both gates compute fp32
logits from the bf16 tokens), so both route the same tokens to the same experts.

Checked before timing: one forward of each on the same tokens; `max_abs_diff` (over all ranks) of ours against
DeepSpeed's output must stay under a tolerance relative to max |y| (1e-4 in fp32, 2e-2 in bf16), else the run
fails. Timed: forward + backward of every implementation once per iteration, interleaved in one process, the
order rotated each iteration (so load from other jobs on a shared machine hits all alike and none always runs
first), a barrier before each. Per implementation: the median over `--iters` (after `--warmup`) of the slowest
rank's wall time (`<name>_ms`) and of the CPU time (user + sys of the whole process, its communication threads
included) averaged over the ranks (`<name>_cpu_ms`). `ours_over_deepspeed` is the median of the per-iteration
ratios ours / DeepSpeed's wall time (each ratio pairs two runs of the same iteration), with its quartiles
(`_p25`, `_p75`) and range (`_min`, `_max`); `ours_over_deepspeed_cpu` the median ratio of the CPU times. On
oversubscribed CPUs (4 ranks on 2 cores) the CPU time is the steadier figure; the paired wall ratio is what
"faster" means.

Bytes per token: one meter for both. During that checking forward `torch.distributed.all_to_all_single` is
wrapped (`WireMeter`) and every byte a rank sends to another rank of the group is summed (its own split stays
home), over all ranks, divided by the global batch's tokens. Ours: the counts exchange (with the balance counts
riding in it when ep_size is the world size), the packed dispatch rows (row, gate weights, expert ids) and the
combine rows. DeepSpeed: its dense (E, C, D) buffer each way, (ep−1)/ep of it leaving the rank; its gate weights
never cross (it combines at home). Not counted (all-reduces, a few bytes per layer): DeepSpeed's capacity maximum,
our balance-count sum when the EP group is not the world. The last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from train.tools.bench_moe import Case, draw_weights, load_ours

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# JSON keys of the times (INTERFACE.md: `ours_ms` is overlap on)
MS_KEYS = {"ours": "ours_ms", "ours_no_overlap": "ours_ms_no_overlap", "ours_fp8": "ours_fp8_ms",
           "deepspeed": "deepspeed_ms"}
_DEVICE = [torch.device("cpu")]  # where the all-reduced figures live (NCCL reduces device tensors only)
RTOL = {"fp32": 1e-4, "bf16": 2e-2}  # max |Δy| ≤ RTOL · max |y|: a routing or weight mismatch is O(max |y|)


class WireMeter:
    """Within `with`, sums `bytes_sent`: the bytes this rank's `torch.distributed.all_to_all_single` calls send to
    OTHER ranks of their group (rows × bytes per row of the input, leaving out the split addressed to itself), and
    records each call's input shape in `shapes`."""

    def __enter__(self) -> "WireMeter":
        self.bytes_sent, self.shapes = 0, []
        self._orig = orig = dist.all_to_all_single

        def metered(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
            rows = input.shape[0] if input.dim() else 0
            if rows:
                me, size = dist.get_rank(group), dist.get_world_size(group)
                splits = input_split_sizes or [rows // size] * size
                self.bytes_sent += (rows - splits[me]) * (input.numel() // rows) * input.element_size()
            self.shapes.append(tuple(input.shape))
            return orig(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

        dist.all_to_all_single = metered
        return self

    def __exit__(self, *exc) -> None:
        dist.all_to_all_single = self._orig


class _OneLayer(nn.Module):
    """The smallest model `parallelize` accepts: one MoE layer."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.ffn = layer

    def moe_layers(self):
        yield 0, self.ffn


def draw_shared(d_model: int, hidden: int, seed: int = 3) -> dict[str, torch.Tensor]:
    """The shared expert's fp32 weights, named as `SwiGLU`'s parameters; normal(0, 0.02)."""
    g = torch.Generator().manual_seed(seed)
    return {"w_gate.weight": 0.02 * torch.randn(hidden, d_model, generator=g),
            "w_up.weight": 0.02 * torch.randn(hidden, d_model, generator=g),
            "w_down.weight": 0.02 * torch.randn(d_model, hidden, generator=g)}


@torch.no_grad()
def _load(module: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    params = dict(module.named_parameters())
    for name, value in weights.items():
        params[name].copy_(value)


def layer_config(args, overlap: bool = True, a2a_dtype: str = "auto"):
    from train.config import load_train_config

    return load_train_config([
        "model=tiny_mixtral", f"model.d_model={args.d_model}", f"model.moe.num_experts={args.experts}",
        f"model.moe.top_k={args.top_k}", f"model.moe.expert_hidden={args.hidden}",
        f"model.moe.num_shared_experts={args.shared_hidden // args.hidden}", f"parallel.ep_size={args.ep_size}",
        f"trainer.device={args.device}", f"parallel.overlap={str(overlap).lower()}", f"parallel.a2a_dtype={a2a_dtype}"])


def build_ours(args, w, shared_w, mesh, overlap: bool, a2a_dtype: str) -> tuple[Callable, nn.Module]:
    """Our layer with all E experts loaded, then sharded by `parallelize` (this rank keeps its E/ep)."""
    from parallel import parallelize
    from train.model.moe.layer import MoELayer

    cfg = layer_config(args, overlap, a2a_dtype)
    layer = MoELayer(cfg.model.d_model, cfg.model.moe, cfg.model.init_std, cfg.model.ffn_activation)
    layer.to(device=mesh.device, dtype=DTYPES[args.dtype])
    layer.router.float()  # fp32 gate weight; its logits are fp32 whatever the weight's dtype
    load_ours(layer, w)
    if layer.shared is not None:
        _load(layer.shared, {k: v.to(mesh.device) for k, v in shared_w.items()})
    parallelize(_OneLayer(layer), cfg, mesh)
    return (lambda x: layer(x)[0]), layer


def build_deepspeed(args, w, shared_w, device) -> tuple[Callable, nn.Module]:
    """DeepSpeed's MoE at ep_size with this rank's experts, plus the shared SwiGLU added outside (docstring)."""
    from parallel.zero.peer_moe import deepspeed_moe
    from train.model.mlp import SwiGLU

    dtype, Fh = DTYPES[args.dtype], args.hidden
    experts = [{"w_gate.weight": w["gate_up_EHD"][e, :Fh], "w_up.weight": w["gate_up_EHD"][e, Fh:],
                "w_down.weight": w["down_EDF"][e]} for e in range(args.experts)]
    moe = deepspeed_moe(args.d_model, SwiGLU(args.d_model, Fh), args.experts, args.top_k, w["router_ED"], experts,
                        ep_size=args.ep_size, dtype=dtype).to(device)
    mods = nn.ModuleDict({"moe": moe})
    if args.shared_hidden:
        mods["shared"] = SwiGLU(args.d_model, args.shared_hidden).to(device=device, dtype=dtype)
        _load(mods["shared"], {k: v.to(device) for k, v in shared_w.items()})
        return (lambda x: moe(x)[0] + mods["shared"](x)), mods
    return (lambda x: moe(x)[0]), mods


def _all_reduce(values: list[float], op=dist.ReduceOp.SUM) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=_DEVICE[0])
    dist.all_reduce(t, op=op)
    return t.tolist()


def run(args, mesh) -> dict:
    """Build every implementation, check ours against DeepSpeed's output, meter the wire, time forward+backward."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = DTYPES[args.dtype]
    w = draw_weights(Case("ep", args.tokens, args.d_model, args.experts, args.hidden, args.top_k))
    shared_w = draw_shared(args.d_model, args.shared_hidden) if args.shared_hidden else {}
    impls = {"ours": build_ours(args, w, shared_w, mesh, True, "auto"),
             "ours_no_overlap": build_ours(args, w, shared_w, mesh, False, "auto")}
    if args.fp8:
        impls["ours_fp8"] = build_ours(args, w, shared_w, mesh, True, "fp8")
    impls["deepspeed"] = build_deepspeed(args, w, shared_w, mesh.device)
    sync = torch.cuda.synchronize if mesh.device.type == "cuda" else (lambda: None)

    x = torch.randn(1, args.tokens, args.d_model, generator=torch.Generator().manual_seed(100 + rank))
    x = x.to(device=mesh.device, dtype=dtype).requires_grad_(True)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(200 + rank)).to(mesh.device, dtype)

    outs, sent, shapes = {}, {}, {}
    with torch.no_grad():
        for name, (fn, _) in impls.items():
            dist.barrier()
            with WireMeter() as meter:
                outs[name] = fn(x).float()
            sent[name], shapes[name] = meter.bytes_sent, meter.shapes
        copies = float(impls["ours"][1].dispatcher.stats["a2a_tokens_sent"])
    global_tokens = args.tokens * world
    names = list(impls)
    totals = _all_reduce([sent[n] for n in names] + [copies])
    diffs = _all_reduce([(outs[n] - outs["deepspeed"]).abs().max().item() for n in names] +
                        [outs["deepspeed"].abs().max().item()], op=dist.ReduceOp.MAX)
    y_max = diffs[-1]
    ds_capacity = shapes["deepspeed"][0][1]  # its first all-to-all sends the (E, C, D) buffer
    max_abs_diff = diffs[names.index("ours")]
    if rank == 0:
        print(f"max |Δy| ours vs deepspeed {max_abs_diff:.3g} (max |y| {y_max:.3g}); deepspeed capacity C = "
              f"{ds_capacity} rows per expert (mean {args.tokens * args.top_k / args.experts:.0f})")
    if not max_abs_diff <= RTOL[args.dtype] * y_max:
        raise SystemExit(f"ours and DeepSpeed's MoE disagree in {args.dtype}: max |Δy| = {max_abs_diff:.3g} > "
                         f"{RTOL[args.dtype]} × max |y| = {y_max:.3g}")

    times, cpu = {n: [] for n in names}, {n: [] for n in names}
    dx = {}
    for it in range(args.warmup + args.iters):
        # every implementation once per iteration, the order rotated each time: what the other jobs on a shared
        # machine do hits all alike, and none always runs first (or right after a given other one)
        shift = it % len(names)
        for name in names[shift:] + names[:shift]:
            fn, mod = impls[name]
            mod.zero_grad(set_to_none=True)
            x.grad = None
            dist.barrier()
            sync()
            start, cpu_start = time.perf_counter(), time.process_time()
            fn(x).backward(grad)
            sync()
            elapsed, cpu_used = time.perf_counter() - start, time.process_time() - cpu_start
            if it >= args.warmup:
                times[name].append(elapsed)
                cpu[name].append(cpu_used)
            dx[name] = x.grad.float()  # the same output gradient for all: the input gradients must agree too
    slowest = _all_reduce([t for n in names for t in times[n]], op=dist.ReduceOp.MAX)
    cpu_sum = _all_reduce([t for n in names for t in cpu[n]])
    n_it = args.iters
    per_iter = {n: slowest[i * n_it : (i + 1) * n_it] for i, n in enumerate(names)}
    cpu_iter = {n: [c / world for c in cpu_sum[i * n_it : (i + 1) * n_it]] for i, n in enumerate(names)}
    ms = {n: 1e3 * statistics.median(per_iter[n]) for n in names}
    cpu_ms = {n: 1e3 * statistics.median(cpu_iter[n]) for n in names}
    # paired: ours against DeepSpeed's run of the same iteration (a burst of load hits both or neither)
    ratios = sorted(o / d for o, d in zip(per_iter["ours"], per_iter["deepspeed"]))
    cpu_ratio = statistics.median(o / d for o, d in zip(cpu_iter["ours"], cpu_iter["deepspeed"]))
    dx_diff = _all_reduce([(dx["ours"] - dx["deepspeed"]).abs().max().item()], op=dist.ReduceOp.MAX)[0]

    result = {"tokens_per_rank": args.tokens, "d_model": args.d_model, "experts": args.experts,
              "hidden": args.hidden, "top_k": args.top_k, "shared_hidden": args.shared_hidden,
              "ep_size": args.ep_size, "world_size": world, "dtype": args.dtype,
              "threads_per_rank": torch.get_num_threads(), "iters": args.iters}
    for i, n in enumerate(names):
        result[MS_KEYS[n]] = ms[n]
        result[MS_KEYS[n].replace("_ms", "_cpu_ms")] = cpu_ms[n]
        if n != "ours_no_overlap":  # the same bytes as ours
            result[f"{n}_bytes_per_token"] = totals[i] / global_tokens
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    result.update(ours_over_deepspeed=statistics.median(ratios), ours_over_deepspeed_p25=q[0],
                  ours_over_deepspeed_p75=q[2], ours_over_deepspeed_min=ratios[0], ours_over_deepspeed_max=ratios[-1],
                  ours_over_deepspeed_cpu=cpu_ratio)
    result.update(max_abs_diff=max_abs_diff, dx_max_abs_diff=dx_diff)
    if args.fp8:
        result["ours_fp8_max_abs_diff"] = diffs[names.index("ours_fp8")]
    result.update(output_max_abs=y_max, deepspeed_capacity=ds_capacity,
                  ours_copies_per_token=totals[len(names)] / global_tokens)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=512, help="tokens per rank")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512, help="routed expert width F")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--shared-hidden", type=int, default=512,
                   help="shared expert width, a multiple of --hidden (0: none)")
    p.add_argument("--ep-size", type=int, default=None, help="default: the world size")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-fp8", dest="fp8", action="store_false", help="skip ours with parallel.a2a_dtype=fp8")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads per rank (default: cores / ranks)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: rank r on cuda:r over NCCL")
    args = p.parse_args()
    if args.shared_hidden % args.hidden:
        raise SystemExit(f"--shared-hidden {args.shared_hidden} must be a multiple of --hidden {args.hidden} "
                         "(our shared experts are num_shared_experts experts of the routed width)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args.ep_size = args.ep_size or world
    if args.ep_size < 2:
        raise SystemExit("bench_ep compares expert parallelism: run it under torchrun with --nproc_per_node >= 2")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(args.threads or max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", world))))

    from parallel import init_distributed, shutdown
    from parallel.zero.peer_moe import init_deepspeed_comm

    mesh = init_distributed(layer_config(args))
    _DEVICE[0] = mesh.device
    init_deepspeed_comm("nccl" if mesh.device.type == "cuda" else "gloo")
    result = run(args, mesh)
    if dist.get_rank() == 0:
        ours = result["ours_ms"]
        print(f"{'':<16} {'wall ms':>9}  {'/ours':>6}  {'cpu ms':>7}  {'B/token':>8}")
        for n, key in MS_KEYS.items():
            if key in result:
                wire = result.get(f"{n}_bytes_per_token", result["ours_bytes_per_token"])
                cpu_key = key.replace("_ms", "_cpu_ms")
                print(f"{n:<16} {result[key]:>9.1f}  x{result[key] / ours:5.2f}  {result[cpu_key]:>7.1f}  {wire:>8.0f}")
        print(f"ours / deepspeed, paired per iteration: median {result['ours_over_deepspeed']:.3f} (quartiles "
              f"{result['ours_over_deepspeed_p25']:.3f}-{result['ours_over_deepspeed_p75']:.3f}, range "
              f"{result['ours_over_deepspeed_min']:.3f}-{result['ours_over_deepspeed_max']:.3f}); cpu time "
              f"{result['ours_over_deepspeed_cpu']:.3f}")
        print(json.dumps(result))
    shutdown(mesh)
