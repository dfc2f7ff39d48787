"""MoE layer forward+backward time: ours against Hugging Face's Mixtral block, DeepSpeed's MoE and torchtitan's MoE,
on the same weights and the same tokens, with a dense floor.

    python scripts/bench_moe.py [--tokens 4096] [--d-model 1024] [--experts 8] [--hidden 2816] [--top-k 2]
                                [--dtype fp32|bf16|both] [--case default|fine|both] [--repeats 5] [--warmup 1]
                                [--threads N] [--torchtitan-path DIR] [--torchtitan-stub-ep]
                                [--compile] [--device cpu|cuda]

Cases: `default` is E experts of width F, top-k K (Mixtral-like: top-k logits, softmax over them). `fine` is the
fine-grained split of the same expert parameters: E·m experts of width F/m with top-`--fine-top-k` (m =
`--fine-granularity`; 64 experts of width 352, top-8 at the defaults).

Implementations, each handed x (1, T, D) with requires_grad and the same output gradient:
- ours: `train.model.moe.layer.MoELayer` from the tiny_mixtral config composed with the shapes as overrides
  (Mixtral routing; the forward also computes the balance terms and statistics, as in training).
- ours_loop: the same layer with `experts.gemm = looped_mm`, one matmul per expert (the test oracle; the GPU
  target compares the grouped path against it). ours_compiled (`--compile`): `torch.compile` of the layer.
- hf: transformers' `MixtralSparseMoeBlock` with `experts_implementation="grouped_mm"` (what `from_pretrained`
  picks in transformers 5); hf_eager: the same block with its per-expert loop.
- deepspeed: `deepspeed.moe.layer.MoE` (ep_size=1 in a one-process gloo group) with our `SwiGLU` as the expert,
  dropless (`drop_tokens=False`), no random token selection and no sampled second expert, so its top-k is the
  same math as Mixtral's. It still computes every expert on a capacity-padded (E, C, D) buffer with C the
  busiest expert's count: more FLOPs than ours when the load is uneven.
- torchtitan: `torchtitan.models.common.moe.MoE` (softmax scores, top-k, `route_norm`: Mixtral's math). Its
  experts always run their GEMMs in bf16 (it casts inside `GroupedExperts.forward`), so its fp32 row is not fp32
  math. Not a project dependency; install it beside the venv, never into it:

      .venv/bin/pip install --no-deps --target /work/.bench-site torchtitan==0.3.0 spmd-types==0.2.3 tyro \
          docstring-parser

  and pass `--torchtitan-path /work/.bench-site` (or set MOEFORGE_TORCHTITAN_PATH). Its token dispatcher module
  imports torchtitan's expert-parallel Triton kernels at import time, so without `triton` (CPU-only torch) the
  import fails and the row reports `torchtitan_ms: null` with the reason. `--torchtitan-stub-ep` registers an
  empty stand-in for that one module (`torchtitan.distributed.minimal_async_ep`, used only by its multi-GPU
  dispatcher, never by the one-process `LocalTokenDispatcher` timed here) so the rest imports on a CPU.
- dense_floor: the same SwiGLU on T·K rows as one dense GEMM per projection (D→2F, F→D) with the same
  activation: the GEMM FLOPs of the routed experts with no routing, permutation or per-expert split, i.e. what a
  perfectly efficient grouped GEMM would cost.

`--dtype bf16` converts every implementation's weights and the input to bf16 (no autocast). Routers keep their
own gate precision: ours and DeepSpeed's compute the gate logits in fp32 from the bf16 weights; HF's in bf16
(softmax in fp32), and torchtitan's too on a CPU (its fp32 autocast region is a no-op there: CPU autocast
supports bf16/fp16 only), so in bf16 those two may route a few tokens differently from ours (each row prints
the fraction), and their max |Δ| then reflects those tokens.

Before timing, in fp32, ours and HF's outputs must agree (asserted); every row prints max |Δ| of the output and
of the input gradient against ours. Timings are the median of `--repeats` after `--warmup` untimed calls. The
last line is JSON: the first case × dtype's figures at the top level and every row in `results`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import types
from dataclasses import asdict, dataclass
from typing import Callable


import torch
import torch.nn.functional as F

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FP32_RTOL = 1e-4  # ours vs HF in fp32, relative to max |y|: same weights and routing, other summation order only


@dataclass
class Case:
    """Shapes of one benchmark case: T tokens, D model dim, E experts, F expert hidden, K active."""

    name: str
    tokens: int
    d_model: int
    experts: int
    hidden: int
    top_k: int


def cases(args) -> list[Case]:
    default = Case("default", args.tokens, args.d_model, args.experts, args.hidden, args.top_k)
    m = args.fine_granularity
    if args.hidden % m:
        raise SystemExit(f"--hidden {args.hidden} must be divisible by --fine-granularity {m}")
    fine = Case("fine", args.tokens, args.d_model, args.experts * m, args.hidden // m, args.fine_top_k)
    return {"default": [default], "fine": [fine], "both": [default, fine]}[args.case]


def draw_weights(c: Case, seed: int = 0) -> dict[str, torch.Tensor]:
    """The one set of fp32 weights every implementation gets, in HF's Mixtral layout: `router_ED`,
    `gate_up_EHD` (E, 2F, D: rows [0, F) gate, [F, 2F) up) and `down_EDF` (E, D, F); normal(0, 0.02)."""
    g = torch.Generator().manual_seed(seed)
    E, D, Fh = c.experts, c.d_model, c.hidden
    return {"router_ED": 0.02 * torch.randn(E, D, generator=g),
            "gate_up_EHD": 0.02 * torch.randn(E, 2 * Fh, D, generator=g),
            "down_EDF": 0.02 * torch.randn(E, D, Fh, generator=g)}


@torch.no_grad()
def load_ours(layer, w: dict[str, torch.Tensor]) -> None:
    """Copy `w` into our `MoELayer`: the only code that knows our expert weight layout. Handles the stacked
    (E, 2F, D) / (E, D, F) layout (`w_gate_up_EHD`, `w_down_EDF`, HF's) and the older (E, D, F) ×2 /
    (E, F, D) one (`w_gate_EDF`, `w_up_EDF`, `w_down_EFD`)."""
    layer.router.gate.weight.copy_(w["router_ED"])
    ex, Fh = layer.experts, w["down_EDF"].shape[-1]
    if hasattr(ex, "w_gate_up_EHD"):
        ex.w_gate_up_EHD.copy_(w["gate_up_EHD"])
        ex.w_down_EDF.copy_(w["down_EDF"])
    else:
        ex.w_gate_EDF.copy_(w["gate_up_EHD"][:, :Fh].transpose(1, 2))
        ex.w_up_EDF.copy_(w["gate_up_EHD"][:, Fh:].transpose(1, 2))
        ex.w_down_EFD.copy_(w["down_EDF"].transpose(1, 2))


def build_ours(c: Case, w, gemm: str = "grouped", compiled: bool = False) -> tuple[Callable, torch.nn.Module]:
    from train.config import compose, to_train_config
    from train.model.moe.layer import MoELayer

    cfg = to_train_config(compose(["model=tiny_mixtral", f"model.d_model={c.d_model}",
                                   f"model.moe.num_experts={c.experts}", f"model.moe.top_k={c.top_k}",
                                   f"model.moe.expert_hidden={c.hidden}"])).model
    layer = MoELayer(cfg.d_model, cfg.moe, cfg.init_std, cfg.ffn_activation)
    load_ours(layer, w)
    if gemm == "loop":
        from train.model.moe.experts import looped_mm

        layer.experts.gemm = looped_mm
    fn = torch.compile(layer) if compiled else layer
    return (lambda x: fn(x)[0]), layer


def build_hf(c: Case, w, impl: str) -> tuple[Callable, torch.nn.Module]:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    hf_cfg = MixtralConfig(hidden_size=c.d_model, intermediate_size=c.hidden, num_local_experts=c.experts,
                           num_experts_per_tok=c.top_k, hidden_act="silu", router_jitter_noise=0.0,
                           experts_implementation=impl)
    block = MixtralSparseMoeBlock(hf_cfg)
    with torch.no_grad():
        block.gate.weight.copy_(w["router_ED"])
        block.experts.gate_up_proj.copy_(w["gate_up_EHD"])
        block.experts.down_proj.copy_(w["down_EDF"])
    return block, block


def init_one_process_group() -> None:
    """A world of one gloo rank (FileStore: no port to find), which DeepSpeed's MoE requires even at ep_size=1."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    store = dist.FileStore(os.path.join(tempfile.mkdtemp(prefix="bench_moe_"), "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    from parallel.zero.peer_moe import init_deepspeed_comm

    init_deepspeed_comm()


def build_deepspeed(c: Case, w) -> tuple[Callable, torch.nn.Module]:
    from parallel.zero.peer_moe import deepspeed_moe
    from train.model.mlp import SwiGLU

    init_one_process_group()
    Fh = c.hidden
    experts = [{"w_gate.weight": w["gate_up_EHD"][e, :Fh], "w_up.weight": w["gate_up_EHD"][e, Fh:],
                "w_down.weight": w["down_EDF"][e]} for e in range(c.experts)]
    moe = deepspeed_moe(c.d_model, SwiGLU(c.d_model, c.hidden), c.experts, c.top_k, w["router_ED"], experts)
    return (lambda x: moe(x)[0]), moe


def import_torchtitan_moe(path: str | None, stub_ep: bool):
    """torchtitan's MoE module, importing from `path` (prepended to sys.path) when given."""
    if path:
        sys.path.insert(0, path)
    if stub_ep and "torchtitan.distributed.minimal_async_ep" not in sys.modules:
        # Names the token dispatcher imports from the Triton-only expert-parallel module; the local
        # (one-process) dispatcher never calls them.
        stub = types.ModuleType("torchtitan.distributed.minimal_async_ep")
        for name in ("combine_op", "dispatch_op", "init_buffer", "MinimalAsyncEPDispatchMetadata",
                     "maybe_update_minimal_async_ep_config"):
            setattr(stub, name, None)
        sys.modules[stub.__name__] = stub
    from torchtitan.models.common import moe

    return moe


def build_torchtitan(c: Case, w, tt) -> tuple[Callable, torch.nn.Module]:
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

    cfg = tt.MoE.Config(
        num_experts=c.experts, load_balance_coeff=None,
        routed_experts=tt.RoutedExperts.Config(
            inner_experts=tt.GroupedExperts.Config(dim=c.d_model, hidden_dim=c.hidden, num_experts=c.experts),
            token_dispatcher=LocalTokenDispatcher.Config(num_experts=c.experts, top_k=c.top_k)),
        router=tt.TokenChoiceTopKRouter.Config(
            num_experts=c.experts, gate=Linear.Config(in_features=c.d_model, out_features=c.experts),
            top_k=c.top_k, score_func="softmax", route_norm=True))
    moe = cfg.build()
    Fh, ex = c.hidden, moe.routed_experts.inner_experts
    with torch.no_grad():
        moe.router.gate.weight.copy_(w["router_ED"])
        ex.w1_EFD.copy_(w["gate_up_EHD"][:, :Fh])
        ex.w3_EFD.copy_(w["gate_up_EHD"][:, Fh:])
        ex.w2_EDF.copy_(w["down_EDF"])
    return moe, moe


def build_dense_floor(c: Case, w, x: torch.Tensor) -> tuple[Callable, torch.nn.Module]:
    """One dense SwiGLU (expert 0's weights) over T·K rows held by the module (x's rows, each K times), so that
    nothing but the routed experts' GEMMs and activation is timed; the argument of the returned function is
    ignored."""
    Fh = c.hidden
    mod = torch.nn.Module()
    mod.x_ND = torch.nn.Parameter(x.detach().reshape(-1, c.d_model).repeat(c.top_k, 1).float())
    mod.w_gate_up_HD = torch.nn.Parameter(w["gate_up_EHD"][0].clone())
    mod.w_down_DF = torch.nn.Parameter(w["down_EDF"][0].clone())

    def floor(_: torch.Tensor) -> torch.Tensor:
        h_NH = F.linear(mod.x_ND, mod.w_gate_up_HD)
        return F.linear(F.silu(h_NH[:, :Fh]) * h_NH[:, Fh:], mod.w_down_DF)

    return floor, mod


def time_fwd_bwd(fn: Callable, mod: torch.nn.Module, x: torch.Tensor, warmup: int, repeats: int) -> float:
    """Median ms of `fn(x)` forward and backward (input and parameter gradients) over `repeats` calls."""
    g = torch.Generator().manual_seed(1)
    grad = None
    times = []
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    for i in range(warmup + repeats):
        mod.zero_grad(set_to_none=True)
        x.grad = None
        sync()
        start = time.perf_counter()
        y = fn(x)
        if grad is None:
            grad = torch.randn(y.shape, generator=g).to(y.device, y.dtype)
        y.backward(grad)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def routing_mismatch(impls: dict, x_BTD: torch.Tensor) -> dict[str, float]:
    """Fraction of tokens whose set of K experts differs from ours, for the peers whose router we can call alone
    (HF's, torchtitan's). DeepSpeed's gate is ours in fp32; its outputs show any difference."""
    x_TD = x_BTD.reshape(-1, x_BTD.shape[-1])
    ours_TK = impls["ours"][1].router(x_TD).topk_ids_TK.sort(-1).values
    peers = {"hf": lambda: impls["hf"][1].gate(x_TD)[2]}
    if "torchtitan" in impls:
        peers["torchtitan"] = lambda: impls["torchtitan"][1].router(x_BTD, None)[1].reshape(x_TD.shape[0], -1)
    return {k: (ids().sort(-1).values != ours_TK).any(-1).float().mean().item() for k, ids in peers.items()}


def run(c: Case, dtype_name: str, args, tt) -> dict:
    """Build every implementation for case `c` in `dtype_name`, check outputs against ours, time each."""
    dtype = DTYPES[dtype_name]
    w = draw_weights(c)
    x = torch.randn(1, c.tokens, c.d_model, generator=torch.Generator().manual_seed(2)).to(args.device, dtype)
    x.requires_grad_(True)
    impls: dict[str, tuple[Callable, torch.nn.Module]] = {
        "ours": build_ours(c, w), "ours_loop": build_ours(c, w, "loop"), "hf": build_hf(c, w, "grouped_mm"),
        "hf_eager": build_hf(c, w, "eager"), "deepspeed": build_deepspeed(c, w),
        "dense_floor": build_dense_floor(c, w, x)}
    if args.compile:
        impls["ours_compiled"] = build_ours(c, w, compiled=True)
    row = {**asdict(c), "case": c.name, "dtype": dtype_name, "torchtitan_ms": None, "torchtitan_error": None}
    del row["name"]
    if isinstance(tt, Exception):
        row["torchtitan_error"] = f"import: {type(tt).__name__}: {tt}"
    else:
        try:
            impls["torchtitan"] = build_torchtitan(c, w, tt)
        except Exception as e:  # noqa: BLE001 - a peer that cannot be built is reported, not fatal
            row["torchtitan_error"] = f"build: {type(e).__name__}: {e}"
    for _, mod in impls.values():
        mod.to(args.device, dtype)

    with torch.no_grad():
        outs = {}
        for name, (fn, _) in impls.items():
            if name == "dense_floor":
                continue
            try:
                if name == "ours":
                    outs[name], info = impls["ours"][1](x)
                    counts_E = info.stats["tokens_per_expert_E"]
                elif name == "ours_compiled":
                    continue  # compiled on first use, inside the timing's warm-up
                else:
                    outs[name] = fn(x)
            except Exception as e:  # noqa: BLE001
                if name != "torchtitan":
                    raise
                row["torchtitan_error"] = f"forward: {type(e).__name__}: {e}"
                del impls["torchtitan"]
                break
        row["routing_mismatch_frac"] = routing_mismatch(impls, x)
    # DeepSpeed runs every expert on C = the busiest expert's count rows: its expert FLOPs over ours.
    row["deepspeed_padded_rows_ratio"] = (c.experts * counts_E.max() / counts_E.sum()).item()
    row["max_abs_diff_vs_ours"] = {k: max_diff(v, outs["ours"]) for k, v in outs.items() if k != "ours"}
    row["output_max_abs"] = outs["ours"].abs().max().item()
    if dtype == torch.float32:
        for k in ("hf", "hf_eager"):
            d = row["max_abs_diff_vs_ours"][k]
            assert d <= FP32_RTOL * row["output_max_abs"], f"ours and HF ({k}) disagree in fp32: max |Δ| = {d:.3g}"

    dx = {}
    for name, (fn, mod) in impls.items():
        try:
            row[f"{name}_ms"] = time_fwd_bwd(fn, mod, x, args.warmup, args.repeats)
        except Exception as e:  # noqa: BLE001
            if name != "torchtitan":
                raise
            row["torchtitan_error"] = f"backward: {type(e).__name__}: {e}"
            continue
        if name != "dense_floor":  # the same output gradient for all: the input gradients must agree too
            dx[name] = x.grad.clone()
    row["dx_max_abs_diff_vs_ours"] = {k: max_diff(v, dx["ours"]) for k, v in dx.items() if k != "ours"}
    ours = row["ours_ms"]
    row["ratios"] = {"hf/ours": row["hf_ms"] / ours, "hf_eager/ours": row["hf_eager_ms"] / ours,
                     "ours_loop/ours": row["ours_loop_ms"] / ours,
                     "ours_compiled/ours": row["ours_compiled_ms"] / ours if args.compile else None,
                     "deepspeed/ours": row["deepspeed_ms"] / ours,
                     "torchtitan/ours": None if row["torchtitan_ms"] is None else row["torchtitan_ms"] / ours,
                     "ours/floor": ours / row["dense_floor_ms"]}
    return row


def print_row(r: dict) -> None:
    print(f"\n== case {r['case']}, {r['dtype']}: T={r['tokens']} D={r['d_model']} E={r['experts']} F={r['hidden']} "
          f"K={r['top_k']} ==")
    diffs, dx = r["max_abs_diff_vs_ours"], r["dx_max_abs_diff_vs_ours"]
    print(f"{'impl':<12} {'ms':>10} {'vs ours':>8}  {'max|Δy| vs ours':>15}  {'max|Δdx| vs ours':>16}  "
          f"(max |y| {r['output_max_abs']:.3g})")
    for name in ("ours", "ours_loop", "ours_compiled", "hf", "hf_eager", "deepspeed", "torchtitan", "dense_floor"):
        ms = r.get(f"{name}_ms")
        if ms is None and name == "ours_compiled":
            continue
        if ms is None:
            print(f"{name:<12} {'-':>10} {'-':>8}  {r['torchtitan_error']}")
            continue
        d, g = diffs.get(name), dx.get(name)
        print(f"{name:<12} {ms:>10.1f} {ms / r['ours_ms']:>8.2f}  {'' if d is None else f'{d:.3g}':>15}  "
              f"{'' if g is None else f'{g:.3g}':>16}")
    mis = ", ".join(f"{k} {100 * v:.2f}%" for k, v in r["routing_mismatch_frac"].items())
    print(f"tokens routed to other experts than ours: {mis}")
    print(f"notes: DeepSpeed computes {r['deepspeed_padded_rows_ratio']:.3f}x our expert rows (capacity padding to "
          "the busiest expert); torchtitan's expert GEMMs are bf16 in every row"
          + ("; HF's and torchtitan's gates run in bf16 here, so a few tokens may route differently" if
             r["dtype"] == "bf16" else ""))
    print("ratios: " + ", ".join(f"{k} {'-' if v is None else f'{v:.2f}'}" for k, v in r["ratios"].items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2816)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--fine-granularity", type=int, default=8, help="fine case: experts × m of width hidden / m")
    p.add_argument("--fine-top-k", type=int, default=8)
    p.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both")
    p.add_argument("--case", choices=["default", "fine", "both"], default="both")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--torchtitan-path", default=os.environ.get("MOEFORGE_TORCHTITAN_PATH"),
                   help="directory holding torchtitan (default: $MOEFORGE_TORCHTITAN_PATH, else a plain import)")
    p.add_argument("--torchtitan-stub-ep", action="store_true",
                   help="stand in for torchtitan's Triton-only expert-parallel module so it imports without triton")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of our layer (ours_compiled)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (DeepSpeed's MoE still runs in a gloo group)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        tt = import_torchtitan_moe(args.torchtitan_path, args.torchtitan_stub_ep)
    except Exception as e:  # noqa: BLE001 - reported in every row
        if isinstance(e, ImportError) and e.name == "triton":
            e = ImportError(f"{e} (torchtitan's token dispatcher imports its Triton expert-parallel kernels; "
                            "--torchtitan-stub-ep stands in for them on a machine without triton)")
        tt = e
        print(f"torchtitan unavailable: {type(e).__name__}: {e}")

    dtypes = ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]
    rows = []
    for c in cases(args):
        for d in dtypes:
            rows.append(run(c, d, args, tt))
            print_row(rows[-1])
    first = rows[0]
    top = {k: first.get(k) for k in ("case", "dtype", "tokens", "d_model", "experts", "hidden", "top_k", "ours_ms",
                                     "ours_loop_ms", "ours_compiled_ms", "hf_ms", "hf_eager_ms", "deepspeed_ms",
                                     "torchtitan_ms", "torchtitan_error", "dense_floor_ms")}
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(json.dumps({**top, "device": device, "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "results": rows}))

