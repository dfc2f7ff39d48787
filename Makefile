# The two commands of the README. Each does all of its own set-up (./.venv, torch, the package) first.
VENV ?= .venv
PY := $(VENV)/bin/python
TRAIN_ARGS ?=

.PHONY: setup train test
setup:
	bash scripts/setup_env.sh

# Main job: train tiny_mixtral on the embedded offline corpus (Python stdlib sources) for 200 steps.
train: setup
	$(PY) -m train model=tiny_mixtral trainer.run_dir=runs/tiny_mixtral $(TRAIN_ARGS)

# Test suite: unit, distributed (gloo ranks on CPU) and integration tiers; the 25 slowest tests are listed at the end.
test: setup
	$(PY) -m pytest -q --durations=25 tests
