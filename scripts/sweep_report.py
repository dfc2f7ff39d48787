"""Report on a Hydra multirun: `python scripts/sweep_report.py SWEEP_DIR`.

The code is `train/tools/sweep_report.py`; this file only runs it."""
from train.tools.sweep_report import main

if __name__ == "__main__":
    main()
