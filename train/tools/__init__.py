"""The code of the hand-run tools in `scripts/` (conversion, upcycling, plots, sweep reports, golden curves,
benchmarks): each `scripts/X.py` is a thin shell that runs `train.tools.X.main` (`make_golden` runs
`train.tools.golden`), so tests import the code, not the script."""
