"""The README's fit table: for each full-size model, the smallest layout whose per-rank plan fits the device, and
the fastest layout that fits a cluster of a stated size.

    python scripts/fit_table.py [--device-memory 80GB] [--headroom 0.1] [--models mixtral_8x7b,...]
        [--cluster 256] [--global-batch 1024] [--no-fastest] [hardware flags of `python -m train.plan`]

Smallest: `train.plan.fit.smallest_fitting_layout` (whole 8-GPU nodes, ep_size dividing the experts and the
world, ZeRO 1/2/3, no pipeline; micro-batch 1 x 4096 tokens, precision=bf16, activation checkpointing `full`).
Fastest: `train.plan.fit.fastest_fitting_layout` on `--cluster` GPUs for a global batch of `--global-batch`
sequences (pp_size x ep_size x ZeRO x checkpointing, by the estimated step time of `train.plan.time`). Prints two
markdown tables.
"""
from __future__ import annotations

import argparse
from dataclasses import replace

from train.plan.cli import hardware, parse_bytes
from train.plan.fit import fastest_fitting_layout, layout_config, smallest_fitting_layout
from train.plan.time import Hardware

FULL_SIZE = ("mixtral_8x7b", "mixtral_8x22b", "dbrx", "deepseek_moe_16b", "deepseek_v2", "deepseek_v2_lite",
             "deepseek_v3")


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f}"


def _smallest(args, device: int) -> None:
    print(f"| model | GPUs | ep_size | ZeRO | params | grads | optimizer | activations | peak (GiB / GPU, of "
          f"{_gib(int(device * (1 - args.headroom)))} usable) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.models.split(","):
        plan = smallest_fitting_layout(layout_config(name), device, args.headroom)
        if plan is None:
            print(f"| {name} | none up to 4096 | | | | | | | |")
            continue
        lay = plan["layout"]
        print(f"| {name} | {lay['world_size']} | {lay['ep_size']} | {lay['zero_stage']} | "
              f"{_gib(plan['params_bytes'])} | {_gib(plan['grads_bytes'])} | {_gib(plan['optimizer_bytes'])} | "
              f"{_gib(plan['activations_bytes'])} | {_gib(plan['peak_bytes'])} |", flush=True)


def _fastest(args, device: int, hw: Hardware) -> None:
    print("\n| model | pp_size (layout) | ep_size | ZeRO | checkpointing | peak GiB | step s | tokens/s/GPU | MFU "
          "| bubble | compute / all-to-all / ZeRO / DP / p2p / bubble, s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.models.split(","):
        cfg = layout_config(name)
        cfg = replace(cfg, trainer=replace(cfg.trainer, global_batch_size=args.global_batch))
        plan = fastest_fitting_layout(cfg, args.cluster, device, args.headroom, hw)
        if plan is None:
            print(f"| {name} | none fits {args.cluster} GPUs | | | | | | | | | |")
            continue
        lay, pipe, p = plan["layout"], plan["pipeline"], plan["step_time_parts_s"]
        pp = f"{pipe['pp_size']}" + (f" {pipe['layout']}" if pipe["pp_size"] > 1 else "")
        parts = " / ".join(f"{p[k]:.2g}" for k in ("compute", "all_to_all", "zero_gather_scatter", "dp_reduce",
                                                  "pp_p2p", "bubble"))
        print(f"| {name} | {pp} | {lay['ep_size']} | {lay['zero_stage']} | {lay['activation_checkpointing']} | "
              f"{_gib(plan['peak_bytes'])} | {plan['step_time_s']:.3g} | {plan['tokens_per_s_per_gpu']:,.0f} | "
              f"{plan['mfu']:.1%} | {plan['bubble_fraction']:.0%} | {parts} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device-memory", default="80GB")
    parser.add_argument("--headroom", type=float, default=0.1)
    parser.add_argument("--models", default=",".join(FULL_SIZE))
    parser.add_argument("--cluster", type=int, default=256, help="GPUs of the fastest-layout search")
    parser.add_argument("--global-batch", type=int, default=1024, help="sequences per step, fastest search")
    parser.add_argument("--no-smallest", action="store_true")
    parser.add_argument("--no-fastest", action="store_true")
    d = Hardware()
    for flag, default in (("peak-tflops", d.peak_tflops), ("compute-efficiency", d.compute_efficiency),
                          ("intra-node-gbps", d.intra_node_gbps), ("inter-node-gbps", d.inter_node_gbps),
                          ("comm-overlap", d.comm_overlap)):
        parser.add_argument(f"--{flag}", type=float, default=default)
    parser.add_argument("--gpus-per-node", type=int, default=d.gpus_per_node)
    args = parser.parse_args()
    device = parse_bytes(args.device_memory)
    if not args.no_smallest:
        _smallest(args, device)
    if not args.no_fastest:
        _fastest(args, device, hardware(args))
