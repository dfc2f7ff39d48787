"""Sharded checkpoint save and load: time and bytes per rank, with real AdamW state.

The code is `train/tools/bench_checkpoint.py`; this file only runs it."""
from train.tools.bench_checkpoint import main

if __name__ == "__main__":
    main()
