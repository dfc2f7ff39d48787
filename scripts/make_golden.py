"""Write the golden loss curves `tests/golden/<model>_fp32.json` that `tests/integration/test_golden.py` checks.

The code is `train/tools/golden.py`; this file only runs it."""
from train.tools.golden import main

if __name__ == "__main__":
    main()
