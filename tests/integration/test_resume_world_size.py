"""Resuming a run through the command line: on the same layout it is bit-exact; on any other world size,
`ep_size` or ZeRO stage the sharded checkpoint is read into the new layout, weights and optimizer state, and the
loss curve continues the uninterrupted run's (train/checkpoint/save_resume.py, train/checkpoint/sharded.py).

The lr schedule is a function of the step alone and all steps here are in warmup, so stopping with max_steps=N
and resuming with a larger max_steps is the same schedule as one uninterrupted run.

Routing is device-limited (`model.moe.device_limit=1`): the first run (2 ranks) resolves `model.moe.routing_groups`
to 2 and stores it, so every later layout must keep routing over 2 groups (one process alone would resolve 1,
which limits nothing); the one-process reference is told `routing_groups=2`.
"""
from __future__ import annotations

import shutil

import pytest
from omegaconf import OmegaConf
from train.checkpoint import iter_weights

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


def run_layout(world: int, ep: int, zero: int, max_steps: int, run_dir, cache, *extra) -> str:
    overrides = [*COMMON, *RESHARD, f"trainer.max_steps={max_steps}", f"trainer.run_dir={run_dir}",
                 f"parallel.ep_size={ep}", f"parallel.zero_stage={zero}", *extra]
    if world == 1:
        proc = train_cli(overrides, cache)
        return proc.stdout + proc.stderr
    return torchrun_cli(world, overrides, cache)


# Every step in warmup (the schedule is then a function of the step alone: stopping at max_steps=2 and resuming
# with 4 is the same schedule as one 6-step run), and a checkpoint at every stop.
RESHARD = ["optim.warmup_steps=20", "trainer.save_every=2"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache):
    """One process, ZeRO 0, six steps: the curve every resharded chain must continue."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_layout(1, 1, 0, 6, run_dir, cache, "model.moe.routing_groups=2")
    return step_records(run_dir)


@pytest.mark.parametrize("chain", [
    # (world, ep_size, zero_stage) for steps 1-2, 3-4, 5-6
    [(2, 2, 2), (4, 4, 2), (1, 1, 0)],  # the chain: grow the world and ep, then one process
    [(2, 2, 1), (2, 1, 1), (2, 2, 3)],  # ep 2 -> ep 1 on the same ranks, then a change of ZeRO stage
], ids=["2ep2z2-4ep4z2-1z0", "2ep2z1-2ep1z1-2ep2z3"])
def test_resharded_resume_continues_the_uninterrupted_curve(chain, tmp_path, cache, uninterrupted):
    """Weights AND optimizer state are restored in every new layout: after a resume the Adam moments must be the
    old ones, or step 4's update (and so the losses of steps 5 and 6) would differ from the reference."""
    run_dir = tmp_path / "run"
    for i, (world, ep, zero) in enumerate(chain):
        out = run_layout(world, ep, zero, 2 * (i + 1), run_dir, cache)
        if i:
            assert "resumed from" in out and "starts fresh" not in out, out[-2000:]
    got = step_records(run_dir)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]  # one metrics.jsonl, continued
    assert [r["tokens"] for r in got] == [s * TOKENS_PER_STEP for s in range(1, 7)]
    for r, r_ref in zip(got, uninterrupted):
        for key in LOSS_KEYS:
            assert r[key] == pytest.approx(r_ref[key], abs=1e-4), (chain, r["step"], key)
        assert r["grad_norm"] == pytest.approx(r_ref["grad_norm"], rel=1e-3), (chain, r["step"])
    # the last checkpoint, written by the last layout, holds the same logical weights as the reference run would
    final = run_dir / "checkpoints" / "step_00000006"
    assert OmegaConf.load(final / "config.yaml").model.moe.routing_groups == 2  # resolved once, kept
    weights = dict(iter_weights(final))
    assert weights and all("/" not in name for name in weights)


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
    final = "checkpoints/step_00000005"
    weights, weights_ref = dict(iter_weights(run_dir / final)), dict(iter_weights(tmp_path / "ref" / final))
    assert weights.keys() == weights_ref.keys()
    for name, w in weights.items():
        assert w.equal(weights_ref[name]), name
