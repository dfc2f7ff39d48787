"""Convert between moeforge checkpoints and Hugging Face model folders.

The code is `train/tools/convert_hf.py`; this file only runs it."""
import sys

from train.tools.convert_hf import main

if __name__ == "__main__":
    sys.exit(main())
