#!/usr/bin/env python
"""Convert between moeforge checkpoints and Hugging Face model folders.

    python scripts/convert_hf.py export CKPT OUT    # CKPT: run dir (newest checkpoint) or one checkpoint
    python scripts/convert_hf.py import HF_DIR OUT  # OUT: a checkpoint for trainer.init_from=OUT

Supported: Mixtral, DBRX, DeepSeek-V2 and DeepSeek-V3 (transformers' native classes).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from train.checkpoint import CheckpointError  # noqa: E402
from train.hf import HFConversionError, export_checkpoint, import_checkpoint  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="moeforge checkpoint -> Hugging Face folder")
    exp.add_argument("ckpt", help="a run dir (its newest complete checkpoint) or one checkpoint dir")
    exp.add_argument("out", help="the Hugging Face folder to write")
    imp = sub.add_parser("import", help="Hugging Face folder -> moeforge checkpoint")
    imp.add_argument("hf_dir", help="a folder with config.json and safetensors weights")
    imp.add_argument("out", help="the checkpoint dir to write (use it as trainer.init_from)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "export":
            print(export_checkpoint(args.ckpt, args.out))
        else:
            print(import_checkpoint(args.hf_dir, args.out))
    except (HFConversionError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
