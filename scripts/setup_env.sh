#!/usr/bin/env bash
# Create (or reuse) ./.venv and install torch plus this package with its dev extras.
#
# torch is installed first and on its own, because a bare `torch` requirement on a machine without torch pulls
# the newest multi-GB CUDA build. Override with TORCH_SPEC (e.g. "torch==2.13.0") and TORCH_INDEX_URL
# (e.g. https://download.pytorch.org/whl/cpu or .../cu128). A torch that is already installed is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        "$PY" -m pip install -q "$TORCH_SPEC" --index-url "$TORCH_INDEX_URL"
    else
        "$PY" -m pip install -q "$TORCH_SPEC"
    fi
fi
"$PY" -m pip install -q -c requirements/constraints.txt -e ".[dev]"
"$PY" -c "import torch, train, parallel; print('moeforge ready: torch', torch.__version__, 'cuda', torch.cuda.is_available())"
