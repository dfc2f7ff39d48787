"""Benchmark the expert-parallel token dispatcher: bytes moved per token (deduplicated vs one copy per
selected expert) and dispatch / combine wall time, for ep_size ∈ {2, 4} and device limit M ∈ {1, 2, None}.

The code is `train/tools/bench_dispatch.py`; this file only runs it."""
from train.tools.bench_dispatch import main

if __name__ == "__main__":
    main()
