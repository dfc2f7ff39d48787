"""`python -m train.plan [overrides] [--device-memory 80GB]`: see `train.plan.cli`."""
import sys

from train.plan.cli import main
from train.quick_exit import skip_final_collection

skip_final_collection()
sys.exit(main(sys.argv[1:]))
