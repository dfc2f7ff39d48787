#!/usr/bin/env python
"""Upcycle a dense model into an MoE checkpoint (train/upcycle.py): experts copied from the FFN, router fresh.

    python scripts/upcycle.py SRC OUT [model overrides] [--noise STD] [--seed S]

SRC: a dense checkpoint of ours (every layer dense) or a dense Hugging Face folder (Llama, Mistral).
OUT: a checkpoint for trainer.init_from=OUT, train.generate and convert_hf.py export. Overrides such as
model.moe.num_experts=8 model.moe.top_k=2 model.moe.granularity=2 choose the MoE shape.
"""
from __future__ import annotations

import argparse
import logging
import sys


from train.checkpoint import CheckpointError
from train.hf import HFConversionError
from train.upcycle import upcycle


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="a dense checkpoint (or run dir) of ours, or a dense Llama/Mistral HF folder")
    parser.add_argument("out", help="the MoE checkpoint dir to write")
    parser.add_argument("overrides", nargs="*", help="model.* overrides, e.g. model.moe.num_experts=8")
    parser.add_argument("--noise", type=float, default=0.0,
                        help="multiplicative noise std on each expert copy: W*(1+eps), eps~N(0,STD^2) (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the router init and the noise (default 0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(upcycle(args.src, args.out, args.overrides, noise_std=args.noise, seed=args.seed))
    except (HFConversionError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0

