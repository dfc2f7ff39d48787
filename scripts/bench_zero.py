"""Per-rank memory and step time of DeepSpeed ZeRO stages 1-3 against moeforge's own stage 0, on the same model,
weights and batches.

The code is `train/tools/bench_zero.py`; this file only runs it."""
from train.tools.bench_zero import main

if __name__ == "__main__":
    main()
