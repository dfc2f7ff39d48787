"""The memory planner's pipeline stages against what each stage rank holds (issue 20), on 4 gloo ranks.

tiny_deepseek_v3 (MTP with its embedding copy on the last stage, shared experts, a dense first layer) shrunk to
a few thousand parameters a layer, pp_size=2 x ep_size=2 (each stage's experts split over its 2 ranks), 4
micro-batches per step, built by the trainer's own `build_model` and run for one step through the pipeline's
schedule and engine, under three layouts in one spawn: 1f1b at ZeRO-1, interleaved 1F1B (2 chunks a rank) at
ZeRO-1, zero bubble at ZeRO-0. On every rank, against `plan_memory`'s figures for its stage:
  - parameters, gradients (after the schedule, before the step), optimizer state and torch's receive buffers:
    equal to the byte. ZeRO-1 is the pipeline's own (`parallel.zero1`): a rank holds AdamW's state of the
    tensors it owns, so ranks of a stage differ by up to a tensor; the planner runs the engine's owner rule
    (`assign_owners`) and states the worst rank's, which must be the stage's largest, and each rank's must be
    its own share;
  - activations, within 10%: the most bytes autograd holds for backward at one time during the schedule
    (`LiveSavedPeak`: saved storages counted once, from pack until autograd releases them, parameters left
    out), plus each chunk's output, which the schedule keeps until that micro-batch's backward. The planner
    weighs each chunk's per-micro-batch activations by the micro-batches alive at its peak in torch's own op
    order (`train.plan.pipeline.rank_ops`), so this also checks that order: 1f1b keeps 2 micro-batches on the
    first stage and 1 on the last, interleaved 3 and 2 of the first rank's two chunks, torch's zero bubble
    (ZB1P) 2 on each stage, from forward to weight pass. The planner assumes balanced routing; a rank's
    measured figure differs by its routing imbalance (up to 6% here).
After each step no saved tensor is left: the zero-bubble pass once kept the last stage's graphs alive through a
reference cycle in the all-to-all's autograd nodes (`parallel.comm.PendingAllToAll.wait`), ~2 MB here.
"""
import contextlib

import pytest
import torch

from tests.distributed._spawn import run_distributed

WORLD, PP, EP, MICRO, SEQ, M = 4, 2, 2, 2, 16, 4
LAYOUTS = [("1f1b", 1, 1), ("interleaved_1f1b", 2, 1), ("zero_bubble", 1, 0)]  # schedule, virtual stages, ZeRO


def make_cfg(schedule: str, virtual: int, zero: int):
    from train.config import load_train_config

    return load_train_config([
        "model=tiny_deepseek_v3", "model.num_layers=4", "model.mtp_depth=1", "model.vocab_size=96",
        "model.d_model=48", "model.dense_hidden=64", "model.moe.expert_hidden=16", f"parallel.ep_size={EP}",
        f"parallel.pp_size={PP}", f"parallel.pp_schedule={schedule}", f"parallel.pp_virtual_stages={virtual}",
        f"parallel.zero_stage={zero}", "trainer.device=cpu", f"trainer.micro_batch_size={MICRO}",
        f"trainer.global_batch_size={MICRO * M * WORLD // PP}", f"trainer.seq_len={SEQ}",
        "optim.schedule=constant", "optim.warmup_steps=0"])


def _measure(cfg, mesh) -> dict:
    """One step of the pipeline: bytes held (gradients before the step, the rest after) and activations' peak."""
    from train.build import EngineArgs, build_model
    from train.plan.measure import LiveSavedPeak

    built = build_model(cfg, mesh, init_seed=0, engine_args=EngineArgs(M))
    engine = built.engine
    # the ranks of one pipeline (same dp_rank) read the same micro-batches; the stage's ranks different ones
    ids = torch.randint(0, 96, (M, MICRO, SEQ + 1), generator=torch.Generator().manual_seed(mesh.dp_rank))
    micro_batches = [{"input_ids": x[:, :-1], "labels": x[:, 1:]} for x in ids]
    peak = LiveSavedPeak({p.untyped_storage().data_ptr() for p in built.model.parameters()})
    for _, chunk in built.pipeline.chunks:
        if not chunk.last:  # its output stays in the schedule's cache until its backward; no node saves it
            chunk.register_forward_hook(lambda module, args, out: peak.hold(out))
    with peak:
        engine.runner.train(micro_batches, contextlib.nullcontext)
    grads = engine.held_bytes()["grads"]
    engine.step()
    buffers = {info.buffer.untyped_storage().data_ptr(): info.buffer.untyped_storage().nbytes()
               for stage in engine.runner.stages
               for infos in (*stage.args_recv_info.values(), *stage.grad_recv_info.values())
               for info in infos if info.buffer is not None}
    return {**engine.held_bytes(), "grads": grads, "pp_buffers": sum(buffers.values()), "activations": peak.peak,
            "left_saved": peak.live}


def _stages_hold_what_the_planner_plans(rank, world_size):
    import torch.distributed as dist

    from parallel import init_distributed
    from train.plan import plan_memory
    from train.plan.pipeline import stage_units, stages
    from train.plan.planner import rank_params
    from train.plan.state import pipeline_zero1_bytes

    for schedule, virtual, zero in LAYOUTS:
        cfg = make_cfg(schedule, virtual, zero)
        mesh = init_distributed(cfg)
        held = _measure(cfg, mesh)
        plan = plan_memory(cfg, WORLD)["pipeline"]["stages"][mesh.pp_rank]
        where = (schedule, zero, rank)
        assert held["left_saved"] == 0, where
        assert held["params"] == plan["params_bytes"], where
        assert held["grads"] == plan["grads_bytes"], where
        assert held["pp_buffers"] == plan["pp_buffers_bytes"], where
        if zero == 0:
            assert held["optimizer"] == plan["optimizer_bytes"], where
        else:
            stage = stages(cfg, M)[mesh.pp_rank]
            named = rank_params(cfg, WORLD // PP).restrict(stage_units(cfg, stage)).named
            mine = pipeline_zero1_bytes([(n, x) for _, n, x in named], mesh.dp_size, EP)["optimizer_by_dp_rank"]
            assert held["optimizer"] == mine[mesh.dp_rank], where
            worst = torch.tensor([held["optimizer"]])
            dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=mesh.dp_group)
            assert int(worst) == plan["optimizer_bytes"], where
        assert held["activations"] == pytest.approx(plan["activations_bytes"], rel=0.10), where


def test_pipeline_stages_hold_what_the_planner_plans():
    run_distributed(_stages_hold_what_the_planner_plans, WORLD)
