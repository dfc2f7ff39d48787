"""Expert-parallel MoE layer forward+backward time and bytes on the wire: ours (overlap on and off, FP8 dispatch)
against DeepSpeed's MoE at the same ep_size, on the same weights and tokens. Run under torchrun:

    torchrun --standalone --nproc_per_node=4 scripts/bench_ep.py

The code is `train/tools/bench_ep.py`; this file only runs it."""
from train.tools.bench_ep import main

if __name__ == "__main__":
    main()
