"""`python -m train.plan model=NAME parallel.world_size=W parallel.ep_size=E parallel.zero_stage=Z [overrides]
[--device-memory 80GB] [--headroom 0.1] [hardware flags]`: the per-rank memory plan (the worst pipeline stage's
with parallel.pp_size > 1) and the estimated step time, a readable table, then one JSON line.

`parallel.world_size` is the one planner-only override (torchrun gives the trainer its world size; default
here: ep_size); every other key, `trainer.activation_checkpointing` included, is the training config's own. The
layout is validated by the trainer's own rules (`validate_config`) for that world size; the global batch size only
sets gradient accumulation, which this plan does not depend on, so unless it is given it is taken as world ×
micro-batch (with parallel.pp_size = P: P micro-batches per pipeline, the fewest its schedule takes; give
trainer.global_batch_size for the step time of a real batch).
The hardware flags set the rates of the step-time model (`train.plan.time`): --peak-tflops, --compute-efficiency,
--intra-node-gbps, --inter-node-gbps, --gpus-per-node, --comm-overlap.
"""
from __future__ import annotations

import argparse
import json
import re
import sys

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from train.config import compose, to_train_config
from train.plan.planner import plan_memory
from train.plan.time import Hardware, estimate_step_time

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'80GB' (10^9), '80GiB' (2^30), '1.5TB', '123456' (bytes) -> bytes; ValueError naming the accepted forms."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"--device-memory {text!r}: expected a positive size such as 80GB, 80GiB, 141GB or "
                         f"85899345920 (units B, KB, MB, GB, TB = powers of 1000; KiB, MiB, GiB, TiB = of 1024)")
    return int(float(m.group(1)) * _UNITS[unit])


def split_overrides(overrides: list[str]) -> tuple[list[str], int | None]:
    """(Hydra overrides, parallel.world_size when given)."""
    rest, world = [], None
    for o in overrides:
        key, _, value = o.lstrip("+").partition("=")
        if key == "parallel.world_size":
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"parallel.world_size={value!r} must be a positive integer (the number of ranks)")
            world = int(value)
        else:
            rest.append(o)
    return rest, world


def load_layout(overrides: list[str]):
    """(validated TrainConfig, world size) from the command's overrides."""
    from dataclasses import replace

    from train.trainer.validate import validate_config

    hydra_overrides, world = split_overrides(overrides)
    cfg = to_train_config(compose(hydra_overrides))
    world = world or cfg.parallel.ep_size
    if not any(o.lstrip("+").startswith("trainer.global_batch_size=") for o in hydra_overrides):
        cfg.trainer = replace(cfg.trainer, global_batch_size=world * cfg.trainer.micro_batch_size)
    validate_config(cfg, world, planning=True)
    return cfg, world


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def render(plan: dict) -> list[str]:
    """The readable table (GiB per rank)."""
    lay, acts = plan["layout"], plan["activations_bytes_by_mode"]
    rows = [
        ("parameters", plan["params_bytes"], ""),
        ("gradients (peak)", plan["grads_bytes"], f"after reduction {_gib(plan['grads_partition_bytes'])}"),
        ("optimizer state", plan["optimizer_bytes"], ""),
        ("activations", plan["activations_bytes"],
         ", ".join(f"{mode} {_gib(acts[mode])}" for mode in ("none", "full", "selective"))),
        ("all-to-all buffers", plan["a2a_buffer_bytes"], f"worst case {_gib(plan['a2a_buffer_worst_bytes'])}"),
        ("transient (backward)", plan["transient_bytes"], ""),
        ("peak", plan["peak_bytes"], ""),
    ]
    if plan.get("pp_buffers_bytes"):  # torch's receive buffers, one per micro-batch of the step
        rows.insert(4, ("pipeline recv buffers", plan["pp_buffers_bytes"],
                        f"{plan['pipeline']['micro_batches']} micro-batches"))
    pipe = plan["pipeline"]
    lines = [
        f"{plan['model']} on {lay['world_size']} ranks (ep_size {lay['ep_size']}, {lay['edp_size']} replicas of each "
        f"expert), ZeRO stage {lay['zero_stage']}, micro-batch {lay['micro_batch_size']} x {lay['seq_len']} tokens, "
        f"{lay['precision']}, activation checkpointing {lay['activation_checkpointing']}",
    ]
    if pipe["pp_size"] > 1:
        lines.append(f"pipeline: {pipe['pp_size']} stages ({lay['dp_size']} ranks each), {pipe['schedule']}"
                     + (f" x {pipe['virtual_stages']} chunks" if pipe["virtual_stages"] > 1 else "")
                     + f", layers {pipe['layout']}, {pipe['micro_batches']} micro-batches; worst stage "
                       f"{plan['stage']} ({plan['layers']} layers, {plan['in_flight']:g} micro-batches in flight)")
    lines += [
        f"per rank: {plan['params_per_rank']['dense']:,} dense + {plan['params_per_rank']['expert']:,} expert "
        f"parameters",
        f"  {'':<22} {'GiB / rank':>10}",
    ]
    lines += [f"  {name:<22} {_gib(n):>10}" + (f"   ({note})" if note else "") for name, n, note in rows]
    if "fits" in plan:
        verdict = "fits" if plan["fits"] else "does NOT fit"
        lines.append(f"  device {_gib(plan['device_memory_bytes'])} GiB, {_gib(plan['usable_bytes'])} GiB usable: "
                     f"{verdict}")
    if "step_time_s" in plan:
        hw, parts = plan["hardware"], plan["step_time_parts_s"]
        lines.append(f"step time ~{plan['step_time_s']:.3g} s ({plan['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU, "
                     f"MFU {plan['mfu']:.1%}, bubble {plan['bubble_fraction']:.1%}) at {hw['peak_tflops']:g} TFLOP/s "
                     f"x {hw['compute_efficiency']:g}, {hw['intra_node_gbps']:g} GB/s intra-node, "
                     f"{hw['inter_node_gbps']:g} GB/s inter-node, {hw['comm_overlap']:.0%} of comm overlapped:")
        lines.append("  " + ", ".join(f"{k} {v:.3g} s" for k, v in parts.items()))
    return lines


def hardware(args) -> Hardware:
    """The step-time model's rates from the flags; ValueError naming a bad one."""
    for flag in ("peak_tflops", "intra_node_gbps", "inter_node_gbps", "gpus_per_node"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be > 0")
    if not 0 < args.compute_efficiency <= 1:
        raise ValueError(f"--compute-efficiency {args.compute_efficiency} must be in (0, 1]")
    if not 0 <= args.comm_overlap <= 1:
        raise ValueError(f"--comm-overlap {args.comm_overlap} must be in [0, 1]")
    return Hardware(args.peak_tflops, args.compute_efficiency, args.intra_node_gbps, args.inter_node_gbps,
                    args.gpus_per_node, args.comm_overlap)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.plan", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device-memory", help="device memory, e.g. 80GB or 80GiB: adds `fits` to the JSON")
    parser.add_argument("--headroom", type=float, default=0.1,
                        help="fraction of the device kept free for the CUDA context, NCCL and fragmentation")
    d = Hardware()
    parser.add_argument("--peak-tflops", type=float, default=d.peak_tflops,
                        help="device peak TFLOP/s in the compute dtype (default: H100/H200 dense bf16)")
    parser.add_argument("--compute-efficiency", type=float, default=d.compute_efficiency,
                        help="fraction of the peak the kernels reach")
    parser.add_argument("--intra-node-gbps", type=float, default=d.intra_node_gbps,
                        help="GB/s per GPU per direction within a node (NVLink)")
    parser.add_argument("--inter-node-gbps", type=float, default=d.inter_node_gbps,
                        help="GB/s per GPU across nodes (InfiniBand)")
    parser.add_argument("--gpus-per-node", type=int, default=d.gpus_per_node)
    parser.add_argument("--comm-overlap", type=float, default=d.comm_overlap,
                        help="fraction of communication hidden behind compute (0: none)")
    args, overrides = parser.parse_known_args(argv)
    try:
        device = parse_bytes(args.device_memory) if args.device_memory is not None else None
        if not 0 <= args.headroom < 1:
            raise ValueError(f"--headroom {args.headroom} must be in [0, 1)")
        bad = [o for o in overrides if o.startswith("-")]
        if bad:
            raise ValueError(f"unknown option(s) {bad}: the planner takes --device-memory, --headroom, the "
                             f"hardware flags (--help) and Hydra overrides key=value")
        hw = hardware(args)
        cfg, world = load_layout(overrides)
        plan = plan_memory(cfg, world, device, args.headroom)
        plan.update(estimate_step_time(cfg, world, plan, hw))
    except (ValueError, HydraException, OmegaConfBaseException) as e:  # ConfigError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(render(plan)))
    print(json.dumps(plan))
    return 0
