"""Activation bytes saved for backward per token under fp32, bf16_autocast and bf16, measured and planned.

The code is `train/tools/bench_precision.py`; this file only runs it."""
from train.tools.bench_precision import main

if __name__ == "__main__":
    main()
