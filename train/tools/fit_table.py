"""The README's fit table: for each full-size model, the smallest layout whose per-rank plan fits the device.

    python scripts/fit_table.py [--device-memory 80GB] [--headroom 0.1] [--models mixtral_8x7b,...]

Search space and tie-break: `train.plan.fit` (whole 8-GPU nodes, ep_size dividing the experts and the world,
ZeRO 1/2/3; micro-batch 1 x 4096 tokens, precision=bf16, activation checkpointing `full`). Prints a markdown table.
"""
from __future__ import annotations

import argparse


from train.plan.cli import parse_bytes
from train.plan.fit import layout_config, smallest_fitting_layout

FULL_SIZE = ("mixtral_8x7b", "mixtral_8x22b", "dbrx", "deepseek_moe_16b", "deepseek_v2", "deepseek_v2_lite",
             "deepseek_v3")


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device-memory", default="80GB")
    parser.add_argument("--headroom", type=float, default=0.1)
    parser.add_argument("--models", default=",".join(FULL_SIZE))
    args = parser.parse_args()
    device = parse_bytes(args.device_memory)
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

