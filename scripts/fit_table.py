"""The README's fit table: for each full-size model, the smallest layout whose per-rank plan fits the device.

The code is `train/tools/fit_table.py`; this file only runs it."""
from train.tools.fit_table import main

if __name__ == "__main__":
    main()
