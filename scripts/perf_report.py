"""Write the speed figures of a `scripts/gpu_check.sh` run into docs/performance.md.

The code is `train/tools/perf_report.py`; this file only runs it."""
from train.tools.perf_report import main

if __name__ == "__main__":
    main()
