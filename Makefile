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

# Test suite: unit, distributed (gloo ranks on CPU) and integration tiers. Two workers: the tests that launch ranks
# run one after another on one of them, the in-process tests on both (tests/conftest.py).
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup tests
