"""MoE layer forward+backward time: ours against Hugging Face's Mixtral block, DeepSpeed's MoE and torchtitan's MoE,
on the same weights and the same tokens, with a dense floor.

The code is `train/tools/bench_moe.py`; this file only runs it."""
from train.tools.bench_moe import main

if __name__ == "__main__":
    main()
