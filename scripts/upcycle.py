"""Upcycle a dense model into an MoE checkpoint (train/upcycle.py): experts copied from the FFN, router fresh.

The code is `train/tools/upcycle.py`; this file only runs it."""
import sys

from train.tools.upcycle import main

if __name__ == "__main__":
    sys.exit(main())
