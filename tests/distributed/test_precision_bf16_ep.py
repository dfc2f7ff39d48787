"""`precision=bf16` under expert parallelism: 2 gloo ranks with ep_size=2 train tiny_deepseek_v3 (MLA, V3 bias,
MTP) through the build pipeline and the trainer's `train_step`, and match one process training the same seeded
model on the same global batches, also in bf16. The all-to-alls carry bf16 rows; the experts' bf16 gradients
are summed over both ranks' tokens in one GEMM on one side and per micro-batch on the other, so the tolerances
are bf16's, not fp32's."""
import pytest
import torch

from tests.distributed._spawn import run_distributed

WORLD, MICRO, ACCUM, SEQ, STEPS = 2, 2, 2, 8, 3
LR = 1e-3


def make_cfg(ep_size: int, checkpointing: str):
    from train.config import load_train_config

    return load_train_config([
        "model=tiny_deepseek_v3", "model.num_layers=2", "model.vocab_size=96", "model.d_model=48",
        "model.dense_hidden=64", "model.moe.expert_hidden=16", "precision=bf16", f"parallel.ep_size={ep_size}",
        f"trainer.activation_checkpointing={checkpointing}", "trainer.device=cpu",
        f"trainer.micro_batch_size={MICRO}", f"trainer.global_batch_size={MICRO * ACCUM * WORLD}",
        f"trainer.seq_len={SEQ}", "optim.schedule=constant", "optim.warmup_steps=0", f"optim.lr={LR}",
    ])


def global_micro_batches(step: int) -> list[dict]:
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, 96, (MICRO * ACCUM * WORLD, SEQ + 1), generator=g)
    return [{"input_ids": ids[i:i + MICRO, :-1], "labels": ids[i:i + MICRO, 1:]} for i in range(0, len(ids), MICRO)]


def train(cfg, mesh, batches_of_step):
    """(records, rank 0's logical weights) of STEPS steps on `batches_of_step(step)`."""
    from parallel import gather_full_state_dict
    from train.build import EngineArgs, build_model
    from train.precision import build_precision
    from train.trainer.schedule import LRSchedule
    from train.trainer.state import TrainState
    from train.trainer.step import StepContext, train_step

    num_micro = len(batches_of_step(0))
    built = build_model(cfg, mesh, init_seed=5, engine_args=EngineArgs(accum_steps=num_micro))
    schedule = LRSchedule(cfg.optim, STEPS)
    state = TrainState(model=built.model, engine=built.engine, scheduler=schedule, data=None)
    ctx = StepContext(precision=build_precision(cfg.precision, mesh.device), schedule=schedule, mesh=mesh,
                      tokens_per_step=0)
    records = [train_step(state, batches_of_step(s), ctx) for s in range(STEPS)]
    return records, gather_full_state_dict(state.model, mesh)


def _ep_matches_one_process(rank, world_size, checkpointing):
    from parallel import Mesh, init_distributed

    cfg = make_cfg(world_size, checkpointing)
    mesh = init_distributed(cfg)
    mine = lambda s: global_micro_batches(s)[rank * ACCUM:(rank + 1) * ACCUM]  # noqa: E731
    records, weights = train(cfg, mesh, mine)
    if rank != 0:
        return
    ref_records, ref_weights = train(make_cfg(1, "none"), Mesh(), global_micro_batches)
    for r, ref in zip(records, ref_records):
        for key in ("loss", "lm_loss", "aux_loss", "mtp_loss"):
            assert r[key] == pytest.approx(ref[key], rel=2e-4), (r["step"], key, r[key], ref[key])  # measured 3e-5
        assert r["grad_norm"] == pytest.approx(ref["grad_norm"], rel=2e-2), (r["step"], r["grad_norm"])
    assert set(weights) == set(ref_weights)
    for name, w in weights.items():
        assert w.dtype == ref_weights[name].dtype
        if w.is_floating_point() and w.dtype == torch.float32:
            # Adam moves an element by ~lr per step: a bf16 rounding that flips a tiny gradient's sign shows as
            # up to 2·lr per step in a few elements (measured 2.7e-3 after 3 steps), a wrong expert slice as the
            # init scale (0.02)
            torch.testing.assert_close(w, ref_weights[name], atol=2 * LR * STEPS, rtol=0, msg=name)


@pytest.mark.parametrize("checkpointing", ["none", "full"])
def test_bf16_expert_parallel_matches_one_process(checkpointing):
    run_distributed(_ep_matches_one_process, WORLD, checkpointing)
