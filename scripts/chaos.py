"""Chaos run: a small multi-rank job under a seeded schedule of faults (hangs, kills, failed saves, damaged
checkpoints, SIGTERM, NaN steps), compared with the same job uninterrupted; last line JSON.

    python scripts/chaos.py --faults 6 --seed 1 [--nproc 4] [--steps 32] [overrides ...]

The code is `train/tools/chaos.py`; this file only runs it."""
from train.tools.chaos import main

if __name__ == "__main__":
    main()
