"""Whole training steps: moeforge's trainer against a plain loop over transformers' `MixtralForCausalLM`, on the
same config, initial weights, batches, optimizer and autocast dtype. Tokens/s and MFU of both.

The code is `train/tools/bench_step.py`; this file only runs it."""
from train.tools.bench_step import main

if __name__ == "__main__":
    main()
