"""Pipeline parallelism through the command line on 4 CPU ranks: `parallel.pp_size` with expert parallelism inside
each stage follows the single-process run (losses, gradient norms, routing loads, final weights), and checkpoints
stay logical: 2 stages → 1 process → 2 stages continues the uninterrupted curve, optimizer state included.

- tiny_deepseek_v3 (MLA, shared expert, bias balancing, node-limited routing, one MTP module, so the last stage
  holds a twin of the embedding): pp 2 x ep 2 with the interleaved schedule (2 chunks per rank) and ZeRO-1, every
  step with gradient accumulation (2 micro-batches per pipeline) and clipping active (grad_clip below every norm);
- resumed on one process at step 2, that one resumed at step 4 on pp 2 x ep 2 under the zero-bubble schedule with a
  hand-set uneven split (3 layers, then 1 with the head and MTP module) and full recompute (which that schedule runs
  twice per region: for the input gradients, then for the weight gradients);
- tiny_mixtral on pp 4 (one layer per stage, plain 1F1B, ZeRO 0, blocks recomputed in backward), and on pp 2 x ep 2
  with ZeRO-1 against the same two data-parallel ranks without pipelining.

The balance losses count routed tokens over the ranks that run a layer together (a stage's data-parallel ranks,
`count_reducer`): with one data-parallel rank per stage (pp 4) that is the single process's micro-batch exactly;
with two, DeepSeek-V3's balance terms are small enough (coefficients ~1e-4) that the curve still agrees to 1e-5.
"""
from __future__ import annotations

import pytest
import torch
from train.checkpoint import iter_weights

from tests.integration._runs import FAST_DATA, step_records, torchrun_cli, train_cli, train_here

pytestmark = pytest.mark.slow

STEPS = 6
COMMON = ["trainer.global_batch_size=8", "trainer.micro_batch_size=2", "trainer.seq_len=32", "model.d_model=64",
          f"trainer.max_steps={STEPS}", "trainer.save_every=2", f"trainer.eval_every={STEPS}", "optim.grad_clip=0.05",
          "logging.progress=false", *FAST_DATA]
V3 = ["model=tiny_deepseek_v3", *COMMON]
MIXTRAL = ["model=tiny_mixtral", *COMMON]
KEYS = ("loss", "lm_loss", "aux_loss", "mtp_loss", "grad_norm", "lr", "tokens", "val_loss")
TOL = 1e-5


def ckpt(run_dir, step: int):
    return run_dir / "checkpoints" / f"step_{step:08d}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache):
    """Run dirs by name, each trained on first use."""
    root = tmp_path_factory.mktemp("pp")
    done = {}

    def get(name: str, nproc: int, overrides) -> tuple:
        """nproc 0: one process in this one (the references); 1: `python -m train`; more: torchrun."""
        if name not in done:
            run_dir = root / name
            args = [*overrides, f"trainer.run_dir={run_dir}"]
            if nproc == 0:
                train_here(args, cache)
                out = ""
            elif nproc == 1:
                proc = train_cli(args, cache)
                out = proc.stdout + proc.stderr
            else:
                out = torchrun_cli(nproc, args, cache)
            done[name] = (run_dir, step_records(run_dir), out)
        return done[name]

    return get


def assert_follows(got, ref, steps, tol):
    by_step = {r["step"]: r for r in ref}
    assert [r["step"] for r in got] == list(steps)
    for r in got:
        for key in KEYS:
            if key in by_step[r["step"]]:
                assert r[key] == pytest.approx(by_step[r["step"]][key], abs=tol, rel=0), (r["step"], key)


def assert_same_weights(run_dir, ref_dir, tol):
    got, ref = dict(iter_weights(ckpt(run_dir, STEPS))), dict(iter_weights(ckpt(ref_dir, STEPS)))
    assert sorted(got) == sorted(ref)
    for name, t in ref.items():
        torch.testing.assert_close(got[name], t, atol=tol, rtol=0, msg=name)


def test_deepseek_v3_pp2_ep2_interleaved_zero1_follows_one_process(runs):
    ref_dir, ref, _ = runs("v3_ref", 0, V3)
    run_dir, got, out = runs("v3_pp2", 4, [*V3, "parallel.pp_size=2", "parallel.ep_size=2",
                                           "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2",
                                           "parallel.zero_stage=1"])
    assert "2 micro-batch(es) per step" in out
    assert all(r["grad_norm"] > 0.05 for r in ref)  # clipping acts on every step
    assert_follows(got, ref, range(1, STEPS + 1), TOL)
    for r, r_ref in zip(got, ref):  # routing statistics are global across the stages, as across EP ranks
        for key in [k for k in r_ref if k.endswith(("tokens_per_expert", "bias_absmean"))]:
            assert r[key] == pytest.approx(r_ref[key], abs=1e-3), (r["step"], key)
    assert_same_weights(run_dir, ref_dir, TOL)  # the V3 expert biases included


def test_resume_two_stages_then_one_process_then_two_stages(runs):
    ref_dir, ref, _ = runs("v3_ref", 0, V3)
    pp_dir, _, _ = runs("v3_pp2", 4, [*V3, "parallel.pp_size=2", "parallel.ep_size=2",
                                      "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2",
                                      "parallel.zero_stage=1"])
    one_dir, one, out = runs("v3_resumed_on_one", 1, [*V3, f"trainer.resume={ckpt(pp_dir, 2)}"])
    assert "resharded checkpoint" in out and "optimizer state starts fresh" not in out
    assert_follows(one, ref, range(3, STEPS + 1), 1e-4)
    two_dir, two, out = runs("v3_resumed_on_pp2", 4, [*V3, f"trainer.resume={ckpt(one_dir, 4)}",
                                                      "parallel.pp_size=2", "parallel.ep_size=2",
                                                      "parallel.pp_schedule=zero_bubble", "parallel.pp_layout=[3,1]",
                                                      "parallel.zero_stage=1", "trainer.activation_checkpointing=full"])
    assert "resumed from" in out
    assert_follows(two, ref, range(5, STEPS + 1), 1e-4)
    assert_same_weights(two_dir, ref_dir, 1e-4)


def test_mixtral_pp4_with_recompute_follows_one_process(runs):
    ref_dir, ref, _ = runs("mixtral_ref", 0, MIXTRAL)
    run_dir, got, _ = runs("mixtral_pp4", 4, [*MIXTRAL, "parallel.pp_size=4",
                                              "trainer.activation_checkpointing=full"])
    assert_follows(got, ref, range(1, STEPS + 1), TOL)
    assert_same_weights(run_dir, ref_dir, TOL)


def test_mixtral_pp2_ep2_zero1_follows_the_same_data_parallel_layout_without_pipelining(runs):
    # two data-parallel ranks per stage: the Switch balance loss counts their micro-batches together, as a
    # non-pipelined run on two ranks does (module docstring), so that run is the reference here
    ref_dir, ref, _ = runs("mixtral_ep2", 2, [*MIXTRAL, "parallel.ep_size=2"])
    run_dir, got, _ = runs("mixtral_pp2_ep2", 4, [*MIXTRAL, "parallel.pp_size=2", "parallel.ep_size=2",
                                                  "parallel.zero_stage=1"])
    assert all(r["aux_loss"] > 0.1 for r in ref)  # a balance loss that matters
    assert_follows(got, ref, range(1, STEPS + 1), TOL)
    assert_same_weights(run_dir, ref_dir, TOL)
