"""The step-time model against measured CPU steps on gloo ranks (compute and communication, measured / planned).

The code is `train/tools/bench_plan_time.py`; this file only runs it."""
from train.tools.bench_plan_time import main

if __name__ == "__main__":
    main()
