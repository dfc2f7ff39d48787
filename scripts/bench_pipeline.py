"""The pipeline's bubble on CPU (2 ranks, 2 stages), measured against the planner's, for one schedule.

The code is `train/tools/bench_pipeline.py`; this file only runs it."""
from train.tools.bench_pipeline import main

if __name__ == "__main__":
    main()
