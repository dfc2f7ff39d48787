"""Plot a run's metrics: `python scripts/plot_run.py RUN_DIR`.

The code is `train/tools/plot_run.py`; this file only runs it."""
from train.tools.plot_run import main

if __name__ == "__main__":
    main()
