"""Construction in shards, measured against the memory planner: what each rank allocates.

The code is `train/tools/bench_construction.py`; this file only runs it."""
from train.tools.bench_construction import main

if __name__ == "__main__":
    main()
