#!/usr/bin/env python
"""Convert between moeforge checkpoints and Hugging Face model folders.

    python scripts/convert_hf.py export CKPT OUT    # CKPT: run dir (newest checkpoint) or one checkpoint
    python scripts/convert_hf.py import HF_DIR OUT  # OUT: a checkpoint for trainer.init_from=OUT

Supported: Mixtral, DBRX, DeepSeek-V2, DeepSeek-V3, Qwen2-MoE (Qwen1.5-MoE), Qwen3-MoE, OLMoE and Llama 4 text
(transformers' native classes).
"""
from __future__ import annotations

import argparse
import logging
import sys


from train.checkpoint import CheckpointError
from train.hf import HFConversionError, export_checkpoint, import_checkpoint


_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}


def shard_size(text: str) -> int:
    """'5GB' -> 5·10^9 bytes, '500MiB' -> 500·2^20."""
    upper = text.strip().upper()
    for unit in sorted(_UNITS, key=len, reverse=True):
        if upper.endswith(unit) and upper[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(upper[: -len(unit)]) * _UNITS[unit])
    raise argparse.ArgumentTypeError(f"{text!r}: expected a size such as 5GB, 500MB or 2GiB")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="moeforge checkpoint -> Hugging Face folder")
    exp.add_argument("ckpt", help="a run dir (its newest complete checkpoint) or one checkpoint dir")
    exp.add_argument("out", help="the Hugging Face folder to write")
    exp.add_argument("--max-shard-size", default="5GB", type=shard_size,
                     help="largest safetensors shard, as save_pretrained's max_shard_size (default 5GB; MB/GB are "
                          "powers of 1000, MiB/GiB of 1024); past it the weights are sharded with an index")
    imp = sub.add_parser("import", help="Hugging Face folder -> moeforge checkpoint")
    imp.add_argument("hf_dir", help="a folder with config.json and safetensors weights")
    imp.add_argument("out", help="the checkpoint dir to write (use it as trainer.init_from)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "export":
            print(export_checkpoint(args.ckpt, args.out, max_shard_bytes=args.max_shard_size))
        else:
            print(import_checkpoint(args.hf_dir, args.out))
    except (HFConversionError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0

