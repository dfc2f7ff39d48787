"""A real multirun followed by `scripts/sweep_report.py`: the table and the plot, and a failed job listed as failed."""
from __future__ import annotations

import sys

import pytest

from tests.integration._runs import FAST_DATA, REPO, run_cli, train_cli

pytestmark = pytest.mark.slow

TINY = ["model=tiny_mixtral", "trainer.max_steps=3", "trainer.global_batch_size=4", "trainer.micro_batch_size=2",
        "trainer.seq_len=32", "trainer.eval_every=3", "logging.progress=false", *FAST_DATA]


def _rows(report: str) -> list[list[str]]:
    lines = [ln for ln in report.splitlines() if ln.startswith("| ") and not ln.startswith("| job")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


def test_granularity_sweep_report(tmp_path, cache):
    sweep = tmp_path / "sweep"
    train_cli(["-m", "sweep=granularity", *TINY, f"hydra.sweep.dir={sweep}"], cache)
    run_cli([sys.executable, str(REPO / "scripts" / "sweep_report.py"), str(sweep)], cache)
    rows = _rows((sweep / "report.md").read_text())
    assert [r[:3] for r in rows] == [["0", "finished", "1"], ["1", "finished", "2"], ["2", "finished", "4"]]
    for r in rows:  # params, active, FLOPs/token, steps, train loss, val loss, tokens/s, imbalance, dropped, loss@C
        assert r[6] == "3/3" and all(c != "–" for c in r[3:]), r
    assert len({r[4] for r in rows}) <= 2  # active parameters held (to the router's few extra outputs)
    assert (sweep / "report.png").stat().st_size > 10_000


def test_failed_job_is_listed_as_failed(tmp_path, cache):
    # granularity 3 does not divide tiny_mixtral's expert width: job 0 fails validation, job 1 still trains.
    # With an explicit trainer.run_dir the runs live in run_dir/<job> and the report finds them there.
    sweep = tmp_path / "sweep"
    proc = train_cli(["-m", "model.moe.granularity=3,2", *TINY, f"hydra.sweep.dir={sweep}",
                      f"trainer.run_dir={tmp_path / 'runs'}"], cache, check=False)
    assert proc.returncode != 0  # Hydra reports the failure after running every job
    run_cli([sys.executable, str(REPO / "scripts" / "sweep_report.py"), str(sweep)], cache)
    report = (sweep / "report.md").read_text()
    rows = _rows(report)
    assert [r[:3] for r in rows] == [["0", "**failed**", "3"], ["1", "finished", "2"]]
    assert "job 0 (failed): moeforge: model.moe.granularity=3 does not divide" in report
    assert (tmp_path / "runs" / "1" / "metrics.jsonl").is_file() and not (sweep / "1" / "metrics.jsonl").exists()
