"""`python -m train -m ...` (a Hydra multirun): every job trains in its own run dir under the sweep dir."""
from __future__ import annotations

import pytest

from tests.integration._runs import FAST_DATA, step_records, train_cli

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("explicit_run_dir", [False, True])
def test_multirun_gives_each_job_its_own_run_dir(tmp_path, explicit_run_dir, cache):
    # With an explicit trainer.run_dir the jobs nest under it instead of sharing (and resuming) one dir.
    sweep = tmp_path / ("runs" if explicit_run_dir else "sweep")
    run_dir = [f"trainer.run_dir={sweep}"] if explicit_run_dir else []
    train_cli(["-m", *run_dir, "model=tiny_mixtral", "model.moe.granularity=1,2", "trainer.max_steps=2",
               "trainer.global_batch_size=4", "trainer.micro_batch_size=2", "trainer.seq_len=32",
               "trainer.eval_every=0", "logging.progress=false", *FAST_DATA, f"hydra.sweep.dir={tmp_path / 'sweep'}"],
              cache)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    num_experts = []
    for job in jobs:
        records = step_records(job)
        assert [r["step"] for r in records] == [1, 2]  # its own metrics.jsonl, not resumed from the other job
        assert (job / "checkpoints" / "step_00000002" / "COMPLETE").is_file()
        assert (job / "config.yaml").is_file()
        num_experts.append(len(records[-1]["moe/layer0/tokens_per_expert"]))
    assert num_experts == [8, 16]  # granularity 1 and 2 of tiny_mixtral's 8 experts
