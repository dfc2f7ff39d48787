"""Activation bytes autograd saves for backward, per token, under each precision recipe: one CPU process, one
forward pass of a tiny model with its loss (`train.plan.measure.saved_tensor_bytes`: distinct storages, parameters
and buffers excluded; `precision=bf16`'s bf16 weight copies are held for the whole step and reported beside, as
`weight_copy_bytes`, not as activations), plus the planner's figure (`train.plan.activations`, the `none` mode).

    python scripts/bench_precision.py [--models tiny_mixtral,tiny_deepseek_v3] [--batch 2] [--seq 256]

Prints one row per model and recipe, the bf16 / bf16_autocast ratio per model, and a JSON last line.
"""
from __future__ import annotations

import argparse
import json

import torch

RECIPES = ("fp32", "bf16_autocast", "bf16")


def measure(model_name: str, precision: str, batch: int, seq: int) -> dict:
    """Saved activation bytes per token of one training forward of `model_name` under `precision`."""
    from parallel import Mesh
    from train.build import build_model
    from train.config import load_train_config
    from train.plan.activations import Shapes, activation_bytes
    from train.plan.measure import saved_tensor_bytes
    from train.precision.bf16 import compute_copy_numel

    cfg = load_train_config([f"model={model_name}", f"precision={precision}", f"trainer.seq_len={seq}"])
    model = build_model(cfg, Mesh(), init_seed=0, stop_after="load").model
    ids = torch.randint(0, cfg.model.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    autocast = torch.bfloat16 if precision == "bf16_autocast" else None
    with torch.no_grad():  # cast the step's bf16 copies first: held state, not activations of this pass
        model(ids[:1, :2])
    saved = saved_tensor_bytes(model, ids[:, :-1], ids[:, 1:], autocast)  # the copies left out, as parameters
    copy_bytes = 2 * compute_copy_numel(model)
    planned = activation_bytes(cfg.model, Shapes.of(precision, batch, seq, device_type="cpu"))
    tokens = batch * seq
    return {"model": model_name, "precision": precision, "saved_bytes_per_token": saved / tokens,
            "planned_bytes_per_token": planned["by_mode"]["none"] / tokens, "weight_copy_bytes": copy_bytes}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny_mixtral,tiny_deepseek_v3")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = [measure(m, r, args.batch, args.seq) for m in args.models.split(",") for r in RECIPES]
    print(f"{'model':<18} {'precision':<14} {'saved B/token':>14} {'planned B/token':>16} {'weight copies B':>16}")
    for r in rows:
        print(f"{r['model']:<18} {r['precision']:<14} {r['saved_bytes_per_token']:>14.0f} "
              f"{r['planned_bytes_per_token']:>16.0f} {r['weight_copy_bytes']:>16}")
    ratios = {}
    for m in args.models.split(","):
        by = {r["precision"]: r["saved_bytes_per_token"] for r in rows if r["model"] == m}
        ratios[m] = by["bf16"] / by["bf16_autocast"]
        print(f"{m}: bf16 saves {ratios[m]:.2f}x the activation bytes of bf16_autocast, "
              f"{by['bf16'] / by['fp32']:.2f}x fp32's")
    print(json.dumps({"batch": args.batch, "seq": args.seq, "rows": rows, "bf16_over_bf16_autocast": ratios}))
