"""train.runs.read_records and train.tools.plot_run (scripts/plot_run.py) on a synthetic metrics.jsonl (a resumed
run repeats steps 3, 4)."""
from __future__ import annotations

import json

from train.runs import read_records
from train.tools import plot_run


def test_plot_run_writes_loss_and_heatmaps(tmp_path):
    steps = [1, 2, 3, 4, 3, 4, 5]
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for s in steps:
            r = {"step": s, "loss": 5.0 / s, "lm_loss": 4.9 / s, "aux_loss": 0.1, "aux/expert_balance": 0.1,
                 "moe/layer1/tokens_per_expert": [s, 2, 3, 4], "moe/layer2/tokens_per_expert": [1, 1, 1, 1]}
            if s == 4:
                r["val_loss"] = 1.5
            f.write(json.dumps(r) + "\n")
    assert [r["step"] for r in read_records(tmp_path)] == [1, 2, 3, 4, 5]
    paths = plot_run.main([str(tmp_path)])
    names = sorted(p.name for p in paths)
    assert names == ["expert_load_layer1.png", "expert_load_layer2.png", "loss.png"]
    assert all((tmp_path / "plots" / n).stat().st_size > 0 for n in names)
