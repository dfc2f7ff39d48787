"""Elastic restart: one of 4 ranks is killed with SIGKILL mid-run; `launch/torchrun.sh` (c10d rendezvous,
--max-restarts) restarts every rank, they resume from the newest complete checkpoint, and the run ends with the
same losses, weights and token count as an uninterrupted one."""
from __future__ import annotations

import os
import signal
import subprocess

import pytest
from train.checkpoint import iter_weights

from parallel.ports import free_port
from tests.integration._runs import FAST_DATA, REPO, env_for, step_records, torchrun_cli
from tests.integration.test_preemption import wait_for_step, worker_pid

pytestmark = pytest.mark.slow

STEPS = 6
COMMON = ["model=tiny_deepseek_v3", "model.num_layers=2", "model.d_model=64", "parallel.ep_size=2",
          f"trainer.max_steps={STEPS}", "trainer.global_batch_size=8", "trainer.micro_batch_size=2",
          "trainer.seq_len=32", "trainer.eval_every=0", "trainer.save_every=2", "logging.progress=false", *FAST_DATA]
EXACT_KEYS = ("loss", "lm_loss", "aux_loss", "grad_norm", "lr", "tokens")


def test_sigkill_of_one_rank_is_survived_exactly(tmp_path, cache):
    torchrun_cli(4, [*COMMON, f"trainer.run_dir={tmp_path / 'full'}"], cache)
    run_dir = tmp_path / "elastic"
    env = env_for(cache)
    env.update(NNODES="1", NODE_RANK="0", NPROC_PER_NODE="4", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               MAX_RESTARTS="1", RDZV_ID="elastic-test")
    proc = subprocess.Popen(["bash", "launch/torchrun.sh", *COMMON, f"trainer.run_dir={run_dir}"], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(run_dir, 3, proc)  # checkpoint of step 2 is complete, step 3 was taken
    os.kill(worker_pid(proc.pid, 2), signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    assert "resumed from" in out
    got = {r["step"]: r for r in step_records(run_dir)}  # re-run steps are logged again; the last one counts
    ref = {r["step"]: r for r in step_records(tmp_path / "full")}
    assert sorted(got) == list(range(1, STEPS + 1))
    for key in EXACT_KEYS:
        assert got[STEPS][key] == ref[STEPS][key], key
    final = f"checkpoints/step_{STEPS:08d}"
    weights, weights_ref = dict(iter_weights(run_dir / final)), dict(iter_weights(tmp_path / "full" / final))
    assert all(w.equal(weights_ref[name]) for name, w in weights.items())
