"""Resuming a run through the command line: on the same world size it is exact; on a different one the
weights and the data position are exact and the optimizer state starts fresh (it is per-rank and follows the
expert sharding; see train/trainer/checkpointing.py).

The first run (2 ranks, ep_size=2) stops at step 3 with a checkpoint. The lr schedule is a function of the
step alone and all steps here are in warmup, so stopping with max_steps=3 and resuming with max_steps=5 is the
same schedule as one 5-step run.

Routing is device-limited (`model.moe.device_limit=1`): the 2-rank run resolves `model.moe.routing_groups` to 2 and
stores it, so the run resumed on one rank must keep routing over 2 groups (one process alone would resolve 1,
which limits nothing); its reference is a one-rank run told `routing_groups=2`.
"""
from __future__ import annotations

import shutil

import pytest
from omegaconf import OmegaConf
from safetensors.torch import load_file

from tests.integration._runs import FAST_DATA, step_records, torchrun_cli, train_cli

pytestmark = pytest.mark.slow

COMMON = ["model=tiny_deepseek_v3", "trainer.global_batch_size=8", "trainer.micro_batch_size=2",
          "trainer.seq_len=32", "trainer.eval_every=0", "trainer.save_every=3", "logging.progress=false",
          "model.moe.device_limit=1", *FAST_DATA]
LOSS_KEYS = ("loss", "lm_loss", "aux_loss", "mtp_loss")
TOKENS_PER_STEP = 8 * 32


def torchrun2(overrides, cache) -> str:
    """`torchrun --standalone --nproc_per_node=2 -m train parallel.ep_size=2 ...`; returns its output."""
    return torchrun_cli(2, ["parallel.ep_size=2", *overrides], cache)


@pytest.fixture(scope="module")
def stopped_at_3(tmp_path_factory, cache):
    """A 2-rank run dir holding the checkpoint of step 3 (tests resume copies of it)."""
    run_dir = tmp_path_factory.mktemp("two_ranks") / "run"
    torchrun2([*COMMON, "trainer.max_steps=3", f"trainer.run_dir={run_dir}"], cache)
    assert (run_dir / "checkpoints" / "step_00000003" / "COMPLETE").is_file()
    return run_dir


def test_resume_two_ranks_on_one_rank_continues_weights_and_data(tmp_path, cache, stopped_at_3):
    run_dir = tmp_path / "resumed"
    shutil.copytree(stopped_at_3, run_dir)
    proc = train_cli([*COMMON, "trainer.max_steps=5", f"trainer.run_dir={run_dir}"], cache)
    train_cli([*COMMON, "model.moe.routing_groups=2", "trainer.max_steps=5", f"trainer.run_dir={tmp_path / 'ref'}"],
              cache)
    got, ref = step_records(run_dir), step_records(tmp_path / "ref")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5]  # the same metrics.jsonl continues
    assert [r["tokens"] for r in got] == [r["tokens"] for r in ref] == [s * TOKENS_PER_STEP for s in range(1, 6)]
    assert [r["lr"] for r in got] == pytest.approx([r["lr"] for r in ref], rel=1e-12)
    # Step 4's losses and gradient norm come from the restored weights on step 4's batch, before any update
    # uses the (fresh) optimizer state: they match the uninterrupted run. Steps 1-3 were taken on 2 ranks,
    # equal to one rank up to float reduction order.
    for r, r_ref in zip(got[:4], ref[:4]):
        for key in LOSS_KEYS:
            assert r[key] == pytest.approx(r_ref[key], abs=1e-4), (r["step"], key)
    assert got[3]["grad_norm"] == pytest.approx(ref[3]["grad_norm"], rel=1e-3)
    # Step 5 follows an update with fresh Adam moments, so it is not compared; the run says so.
    assert "optimizer state starts fresh" in proc.stdout + proc.stderr
    assert OmegaConf.load(run_dir / "checkpoints" / "step_00000005" / "config.yaml").model.moe.routing_groups == 2


def test_resume_on_the_same_two_ranks_is_exact(tmp_path, cache, stopped_at_3):
    run_dir = tmp_path / "resumed"
    shutil.copytree(stopped_at_3, run_dir)
    out = torchrun2([*COMMON, "trainer.max_steps=5", f"trainer.run_dir={run_dir}"], cache)
    assert "optimizer state starts fresh" not in out
    torchrun2([*COMMON, "trainer.max_steps=5", f"trainer.run_dir={tmp_path / 'ref'}"], cache)
    got, ref = step_records(run_dir), step_records(tmp_path / "ref")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
    for r, r_ref in zip(got, ref):
        for key in (*LOSS_KEYS, "tokens", "lr", "grad_norm", "moe/a2a_tokens_sent"):
            assert r[key] == r_ref[key], (r["step"], key)
    final = "checkpoints/step_00000005/model.safetensors"
    weights, weights_ref = load_file(run_dir / final), load_file(tmp_path / "ref" / final)
    assert weights.keys() == weights_ref.keys()
    for name, w in weights.items():
        assert w.equal(weights_ref[name]), name
