"""Activations the memory planner predicts against the bytes the real model keeps, one CPU process.

The code is `train/tools/plan_check.py`; this file only runs it."""
from train.tools.plan_check import main

if __name__ == "__main__":
    main()
