"""`python -m train.plan [overrides] [--device-memory 80GB]`: see `train.plan.cli`."""
import sys

from train.plan.cli import main

sys.exit(main(sys.argv[1:]))
