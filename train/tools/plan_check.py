"""Activations the memory planner predicts against the bytes the real model keeps, one CPU process.

    python scripts/plan_check.py [--batch 2] [--seq-len 64] [--models tiny_mixtral,...] [--modes none,full,selective]

For every tiny family in fp32 and bf16_autocast and every `trainer.activation_checkpointing` mode, applied with
`parallel/activation_checkpointing.py`, the measurement of `train.plan.measure` beside `train.plan.activations` for
the same shapes (`device_type=cpu`): kept bytes (autograd's saved storages for `none` and `full`; the storages the
forward leaves alive for `selective`, whose kept matmul outputs sit in the checkpoint's cache) and, for the
checkpointing modes, the peak that backward's recomputation holds (the planner's transient). Prints a markdown
table and a JSON last line.
"""
from __future__ import annotations

import argparse
import dataclasses
import json


import torch

from parallel.mesh import Mesh
from train.build import build_model
from train.config import load_train_config
from train.plan import MODES, Shapes, activation_bytes
from train.plan.measure import alive_tensor_bytes, recompute_peak_bytes, saved_tensor_bytes

MODELS = ("tiny_mixtral", "tiny_dbrx", "tiny_deepseek_moe", "tiny_deepseek_v2", "tiny_deepseek_v3")


def _model(cfg, mode: str):
    """The model as the build pipeline makes it for one process under checkpointing `mode`, in training mode."""
    cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, activation_checkpointing=mode))
    return build_model(cfg, Mesh(), init_seed=0, stop_after="load").model.train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models: a second thread only contends
    rows = []
    print("| model | precision | mode | kept, measured B | kept, planned B | planned / measured "
          "| recompute peak, measured B | recompute, planned B | planned / measured |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.models.split(","):
        for precision in ("fp32", "bf16_autocast"):
            cfg = load_train_config([f"model={name}", f"precision={precision}"])
            ids = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq_len + 1),
                                generator=torch.Generator().manual_seed(1))
            x, y = ids[:, :-1], ids[:, 1:]
            dtype = torch.bfloat16 if precision == "bf16_autocast" else None
            plan = activation_bytes(cfg.model, Shapes(args.batch, args.seq_len, precision == "bf16_autocast",
                                                      device_type="cpu"))
            for mode in args.modes.split(","):
                measure = alive_tensor_bytes if mode == "selective" else saved_tensor_bytes
                row = {"model": name, "precision": precision, "mode": mode,
                       "measured": measure(_model(cfg, mode), x, y, dtype), "planned": plan["by_mode"][mode]}
                line = (f"| {name} | {precision} | {mode} | {row['measured']:,} | {row['planned']:,} | "
                        f"{row['planned'] / row['measured']:.4f} |")
                if mode != "none":
                    row["recompute_measured"] = recompute_peak_bytes(_model(cfg, mode), x, y, dtype)
                    row["recompute_planned"] = plan["recompute_by_mode"][mode]
                    line += (f" {row['recompute_measured']:,} | {row['recompute_planned']:,} | "
                             f"{row['recompute_planned'] / row['recompute_measured']:.3f} |")
                else:
                    line += " | | |"
                rows.append(row)
                print(line, flush=True)
    print(json.dumps({"batch": args.batch, "seq_len": args.seq_len, "rows": rows}))

