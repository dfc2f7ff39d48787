"""Golden loss curves: a short deterministic fp32 run of each tiny model must reproduce tests/golden/*.json.

A refactor that should not change the computation must pass this unchanged. If a change is MEANT to alter the
numbers (init, a loss term, data order, a bug fix), regenerate with `python scripts/make_golden.py` and say
why in the change. The tolerance is absolute 1e-5 rather than bitwise: the run is deterministic on one
machine, but BLAS kernels block and vectorise differently on different CPUs, so the last bits can differ.
"""
from __future__ import annotations

import json

import pytest

from train.tools import golden as make_golden

ATOL = 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("model", make_golden.MODELS)
def test_reproduces_golden_loss_curve(model, tmp_path):
    golden = json.loads((make_golden.GOLDEN_DIR / f"{model}_fp32.json").read_text())
    assert golden["overrides"] == make_golden.OVERRIDES, "the run settings changed: regenerate on purpose"
    got = make_golden.run_golden(model, tmp_path)
    want = golden["steps"]
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        assert set(g) == set(w), (g, w)
        for key in make_golden.KEYS:
            if key in w:
                assert g[key] == pytest.approx(w[key], abs=ATOL, rel=0), (model, w["step"], key, g[key], w[key])
    if model == "tiny_deepseek_v3":
        assert all("mtp_loss" in w for w in want)
