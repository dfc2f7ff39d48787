"""`scripts/chaos.py` with a short schedule: a hang (SIGSTOP of one rank) found by its peers' watchdogs, a SIGKILL
while the job restarts from it, and a save that fails part-way (a file-size limit on one rank): the run ends with
the weights, tokens and every step's loss of the uninterrupted run. Two ranks keep it near two minutes (most of
it torchrun's 30 s wait before it kills the stopped rank, and four starts); the 4-rank, 6-fault runs are by hand
(docs/guide/reliability.md)."""
from __future__ import annotations

import json
import sys

import pytest

from tests.integration._runs import run_cli

pytestmark = pytest.mark.slow

WATCHDOG_S = 8
SLACK_S = 5  # the watchdog's poll (<= 1 s), the dump, the harness reading the output, a loaded machine


def test_three_faults_in_a_row_are_survived_exactly(tmp_path, cache):
    proc = run_cli([sys.executable, "scripts/chaos.py", "--faults", "3", "--seed", "0", "--nproc", "2", "--steps",
                    "16", "--watchdog-s", str(WATCHDOG_S), "--workdir", str(tmp_path)], cache, timeout=600)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    faults = result["faults"]
    assert [f["kind"] for f in faults] == ["hang", "kill", "save_fail"], faults
    assert not any("skipped" in f for f in faults), json.dumps(faults)
    assert faults[1]["during_recovery"]
    assert 0 < faults[0]["detected_s"] <= WATCHDOG_S + SLACK_S
    assert result["recovered"] and result["weights_equal"] and result["tokens_equal"] and result["losses_equal"]
    assert result["final_loss"] == result["reference_final_loss"]
    assert result["lost_steps"] >= 1 and result["watchdog_dumps"] >= 1
    stacks = "".join(p.read_text() for p in (tmp_path / "chaos" / "watchdog").glob("rank_*.log"))
    assert "made no progress" in stacks and "most recent call first" in stacks and "in train_step" in stacks
