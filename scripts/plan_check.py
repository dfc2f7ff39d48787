"""Activations the memory planner predicts against the bytes autograd really saves, one CPU process.

    python scripts/plan_check.py [--batch 2] [--seq-len 64]

For every tiny family in fp32 and bf16 (autocast): distinct storages saved for backward by one training forward
pass, counted with saved-tensor hooks (`train.plan.measure`), beside `train.plan.activations` for the same shapes
(`device_type=cpu`, no checkpointing). Prints a markdown table and a JSON last line.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from train.config import load_train_config  # noqa: E402
from train.model import build_model  # noqa: E402
from train.plan import Shapes, activation_bytes  # noqa: E402
from train.plan.measure import saved_tensor_bytes  # noqa: E402

MODELS = ("tiny_mixtral", "tiny_dbrx", "tiny_deepseek_moe", "tiny_deepseek_v2", "tiny_deepseek_v3")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    args = parser.parse_args()
    rows = []
    print("| model | precision | measured B | planned B | planned / measured |")
    print("| --- | --- | --- | --- | --- |")
    for name in MODELS:
        for precision in ("fp32", "bf16"):
            cfg = load_train_config([f"model={name}", f"precision={precision}"])
            torch.manual_seed(0)
            ids = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq_len + 1))
            dtype = torch.bfloat16 if precision == "bf16" else None
            measured = saved_tensor_bytes(build_model(cfg.model), ids[:, :-1], ids[:, 1:], dtype)
            shapes = Shapes(args.batch, args.seq_len, precision == "bf16", device_type="cpu")
            planned = activation_bytes(cfg.model, shapes)["by_mode"]["none"]
            rows.append({"model": name, "precision": precision, "measured": measured, "planned": planned})
            print(f"| {name} | {precision} | {measured:,} | {planned:,} | {planned / measured:.4f} |", flush=True)
    print(json.dumps({"batch": args.batch, "seq_len": args.seq_len, "rows": rows}))


if __name__ == "__main__":
    main()
