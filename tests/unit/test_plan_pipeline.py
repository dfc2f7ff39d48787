"""The planner's pipeline and step-time arithmetic (issue 20): schedules' micro-batches in flight and bubbles by
hand, the stage split, the pipeline's validation (one line naming the fields;
a pipeline trains as the planner plans it, compiled stages aside), per-stage memory adding up to the whole model, and the step-time formula's pieces on
hand-computed examples. In-process and fast; the time model against measured CPU steps is
`scripts/bench_plan_time.py` (no timed tests)."""
import json
from dataclasses import replace

import pytest

from train.config import load_train_config
from train.config.errors import ConfigError
from train.config.pipeline import PIPELINE_COMPILE, ZERO_BUBBLE_SELECTIVE, even_layout
from train.flops import flops_per_token
from train.plan import plan_memory
from train.plan.cli import main
from train.plan.pipeline import bubble_fraction, in_flight, rank_ops, stages
from train.plan.time import Hardware, _a2a_seconds, _ring, balanced_layout, estimate_step_time, stage_flops_per_token
from train.trainer.dry_run import dry_run
from train.trainer.validate import validate_config


def _cfg(*overrides):
    return load_train_config(["model=tiny_mixtral", "trainer.micro_batch_size=1", "trainer.seq_len=32",
                              *overrides])


def test_micro_batches_in_flight_and_bubble_by_hand():
    # 1F1B, P = 4, m = 8: stage i holds P - i; the bubble is (P - 1)/(m + P - 1)
    assert [in_flight("1f1b", 4, 1, 8, i) for i in range(4)] == [4, 3, 2, 1]
    assert in_flight("1f1b", 4, 1, 2, 0) == 2  # never more than the step's micro-batches
    assert bubble_fraction("1f1b", 4, 1, 8) == pytest.approx(3 / 11)
    # interleaved, v = 2: stage 0 keeps P·(1 + (P - 1)/(P·v)) = 4·(1 + 3/8) = 5.5 micro-batches of its layers
    # (Megatron's (v-1)·P + 2·(P-1) warm-up chunks + 1, each half the rank's layers); the bubble shrinks v-fold
    assert in_flight("interleaved_1f1b", 4, 2, 8, 0) == 5.5
    assert in_flight("interleaved_1f1b", 4, 2, 8, 3) == (4 + 1) / 2
    assert bubble_fraction("interleaved_1f1b", 4, 2, 8) == pytest.approx(3 / 19)
    # torch's zero bubble is ZB1P (ZB-H1): every stage keeps P micro-batches (from forward to weight pass); with
    # F = I = W the simulated bubble is 1 - 24/27 at P = 4, m = 8 (the step: 27 pass times, 24 of them busy)
    assert [in_flight("zero_bubble", 4, 1, 8, i) for i in range(4)] == [4, 4, 4, 4]
    assert bubble_fraction("zero_bubble", 4, 1, 8) == pytest.approx(1 - 24 / 27)
    assert in_flight("1f1b", 1, 1, 8, 0) == 1 and bubble_fraction("1f1b", 1, 1, 8) == 0


@pytest.mark.parametrize("schedule,P,v,m", [("1f1b", 2, 1, 4), ("1f1b", 4, 1, 8), ("1f1b", 2, 2, 4),
                                            ("interleaved_1f1b", 4, 2, 8), ("interleaved_1f1b", 4, 3, 12),
                                            ("interleaved_1f1b", 4, 2, 12), ("zero_bubble", 2, 1, 4),
                                            ("zero_bubble", 4, 1, 6), ("zero_bubble", 4, 2, 8)])
def test_op_order_is_torchs(schedule, P, v, m):
    """`rank_ops` re-derives the order torch.distributed.pipelining runs each rank's passes in (what the planner's
    in-flight counts stand on): equal to torch's own tables. Its 1F1B table numbers the last rank's micro-batches
    from 1 (the runtime, `Schedule1F1B._step_microbatches`, runs its own loop from 0): kinds and chunks only there."""
    from torch.distributed.pipelining import schedules as S

    kinds = {S._ComputationType.FORWARD: "F", S._ComputationType.FULL_BACKWARD: "B",
             S._ComputationType.BACKWARD_INPUT: "I", S._ComputationType.BACKWARD_WEIGHT: "W"}
    if schedule == "1f1b" and v == 1:
        sch = S.Schedule1F1B.__new__(S.Schedule1F1B)
        sch._num_stages, sch._n_microbatches = P, m
        order = sch._get_pipeline_order()
    else:
        cls = S.ScheduleInterleavedZeroBubble if schedule == "zero_bubble" else S.ScheduleInterleaved1F1B
        sch = cls.__new__(cls)
        sch.pp_group_size, sch.n_local_stages, sch._n_microbatches = P, v, m
        sch.microbatches_per_round = m // max(1, m // P)
        order = {i: sch._calculate_single_rank_operations(i) for i in range(P)}
    for i in range(P):
        theirs = [(kinds[a.computation_type], a.stage_index // P, a.microbatch_index) for a in order[i]
                  if a is not None and a.computation_type in kinds]
        ours = rank_ops(schedule, P, v, m, i)
        if schedule == "1f1b" and v == 1:
            theirs, ours = [a[:2] for a in theirs], [a[:2] for a in ours]
        assert ours == theirs, i


def test_stage_split():
    cfg = _cfg("parallel.pp_size=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2",
               "parallel.pp_layout=[1,1,1,1]")
    s0, s1 = stages(cfg, 4)
    # chunk c on rank c mod 2: rank 0 runs layers 0 and 2, rank 1 layers 1 and 3 and the head (the last chunk)
    assert (s0.layers, s0.first, s0.last) == ((0, 2), True, False)
    assert (s1.layers, s1.first, s1.last) == ((1, 3), False, True)
    assert even_layout(61, 16) == [3] + [4] * 13 + [3, 3] and sum(even_layout(7, 3)) == 7


@pytest.mark.parametrize("overrides,world,message", [
    (["parallel.pp_size=3"], 6, "model.num_layers=4 does not divide into parallel.pp_size x "
                                "parallel.pp_virtual_stages = 3 x 1 = 3 chunks: set parallel.pp_layout"),
    (["parallel.pp_size=2", "parallel.pp_layout=[1,2]"], 4, "parallel.pp_layout=[1, 2] sums to 3 layers, but "
                                                            "model.num_layers=4"),
    (["parallel.pp_size=2", "parallel.pp_layout=[4]"], 4, "must have parallel.pp_size x parallel.pp_virtual_stages"),
    (["parallel.pp_size=4", "trainer.global_batch_size=2"], 4, "gives 2 micro-batches per pipeline"),
    (["parallel.pp_size=2", "parallel.ep_size=4"], 4, "parallel.ep_size=4 does not divide the 2 ranks of a stage"),
    (["parallel.pp_size=2", "parallel.zero_stage=3"], 4, "parallel.zero_stage=3 with parallel.pp_size=2"),
    (["parallel.pp_size=2", "parallel.pp_schedule=interleaved_1f1b"], 4, "needs parallel.pp_virtual_stages >= 2"),
    (["parallel.pp_size=2", "parallel.pp_virtual_stages=2"], 4, "only applies to parallel.pp_schedule="
                                                                "interleaved_1f1b"),
    (["parallel.pp_size=3"], 4, "parallel.pp_size=3 does not divide the world size 4"),
    (["parallel.pp_schedule=zero_bubble"], 1, "parallel.pp_size=1 has none"),
])
def test_pipeline_validation_names_the_fields(overrides, world, message):
    cfg = _cfg("trainer.global_batch_size=16", *overrides)
    with pytest.raises(ConfigError, match="^" + ".*") as e:
        validate_config(cfg, world, planning=True)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_training_and_dry_run_accept_the_pipeline_the_planner_plans(capsys):
    cfg = _cfg("parallel.pp_size=2", "trainer.global_batch_size=4")
    validate_config(cfg, 2, planning=True)
    validate_config(cfg, 2)
    assert dry_run(cfg, 2)["dry_run"] == "ok"
    with pytest.raises(ConfigError) as e:
        validate_config(replace(cfg, trainer=replace(cfg.trainer, compile=True)), 2)
    assert str(e.value) == PIPELINE_COMPILE.format(pp=2)
    zb = _cfg("parallel.pp_size=2", "trainer.global_batch_size=4", "parallel.pp_schedule=zero_bubble",
              "trainer.activation_checkpointing=selective")
    with pytest.raises(ConfigError) as e:
        validate_config(zb, 2)
    assert str(e.value) == ZERO_BUBBLE_SELECTIVE
    assert main(["model=tiny_mixtral", "parallel.world_size=2", "parallel.pp_size=2"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plan["pipeline"]["micro_batches"] == 2 and plan["bubble_fraction"] == pytest.approx(1 / 3)
    for key in ("step_time_s", "tokens_per_s_per_gpu", "mfu", "bubble_fraction"):
        assert plan[key] > 0


def test_stages_add_up_to_the_whole_model():
    """Every parameter on exactly one stage (MTP's shared embedding also on the last), and each stage's
    activations its in-flight count times its share of the one-stage figure."""
    for name in ("tiny_mixtral", "tiny_deepseek_v3"):
        base = ["model=" + name, "trainer.micro_batch_size=1", "trainer.seq_len=32", "parallel.ep_size=2"]
        one = plan_memory(load_train_config(base), 4)
        cfg = load_train_config([*base, "parallel.pp_size=2", "parallel.pp_layout=[3,1]",
                                 "trainer.global_batch_size=8"])
        two = plan_memory(cfg, 8)
        st = two["pipeline"]["stages"]
        assert [s["in_flight"] for s in st] == [2, 1] and [s["layers"] for s in st] == [3, 1]
        total = {k: sum(s["params_per_rank"][k] for s in st) for k in ("dense", "expert")}
        m = cfg.model
        shared = m.vocab_size * m.d_model if m.mtp_depth else 0
        assert total == {"dense": one["params_per_rank"]["dense"] + shared, "expert": one["params_per_rank"]["expert"]}
        for mode in ("none", "full"):
            c = replace(cfg, trainer=replace(cfg.trainer, activation_checkpointing=mode))
            acts = sum(s["activations_bytes"] / s["in_flight"] for s in plan_memory(c, 8)["pipeline"]["stages"])
            # plus the first stage's output, which the schedule keeps until its backward (fp32, 32 tokens)
            assert acts == pytest.approx(one["activations_bytes_by_mode"][mode] + 32 * m.d_model * 4, abs=2)


def test_step_time_pieces_by_hand():
    hw = Hardware(peak_tflops=1.0, compute_efficiency=0.5, intra_node_gbps=1.0, inter_node_gbps=0.25,
                  gpus_per_node=8)
    # a ring all-gather of 100 bytes over 4 ranks moves 3/4 of them; across nodes at the inter-node rate
    assert _ring(100, 4, hw, span=False) == pytest.approx(75e-9)
    assert _ring(100, 4, hw, span=True) == pytest.approx(300e-9)
    # all-to-all over 16 consecutive ranks, 8 a node: 8 of the 15 other ranks are on the other node
    assert _a2a_seconds(15, 10, 16, hw) == pytest.approx(max(70 / 1e9, 80 / 0.25e9))
    assert _a2a_seconds(7, 10, 8, hw) == pytest.approx(70 / 1e9)

    # one rank, no communication: the step is m micro-batches of compute at peak x efficiency
    cfg = _cfg("trainer.global_batch_size=3")
    m = cfg.model
    f = stage_flops_per_token(cfg, list(range(m.num_layers)), last=True)
    assert f == pytest.approx(flops_per_token(m, 32))  # no MTP: the stage is the model
    est = estimate_step_time(cfg, 1, plan_memory(cfg, 1), hw)
    assert est["step_time_s"] == pytest.approx(3 * 32 * f / 0.5e12)
    assert est["mfu"] == pytest.approx(0.5) and est["bubble_fraction"] == 0
    assert est["tokens_per_s_per_gpu"] == pytest.approx(3 * 32 / est["step_time_s"])
    # full checkpointing reruns each block's forward: +1/3 of the blocks' FLOPs
    full = replace(cfg, trainer=replace(cfg.trainer, activation_checkpointing="full"))
    head = 6.0 * (m.d_model + m.vocab_size * m.d_model)
    assert stage_flops_per_token(full, list(range(m.num_layers)), True) == pytest.approx((f - head) * 4 / 3 + head)

    # 16 ranks on two nodes, stage 0 data parallelism: one all-reduce (2 rings) of the fp32 gradients over IB
    dp16 = _cfg("trainer.global_batch_size=16")
    plan = plan_memory(dp16, 16)
    est = estimate_step_time(dp16, 16, plan, hw)
    n = plan["params_per_rank"]["dense"] + plan["params_per_rank"]["expert"]
    assert est["step_time_parts_s"]["dp_reduce"] == pytest.approx(2 * 15 / 16 * 4 * n / 0.25e9)

    # a 1F1B pipeline of 2 stages: m micro-batches of the slower stage, stretched by the bubble
    pp = _cfg("parallel.pp_size=2", "trainer.global_batch_size=4")
    plan = plan_memory(pp, 2)
    est = estimate_step_time(pp, 2, plan, hw)
    s1 = 32 * stage_flops_per_token(pp, [2, 3], last=True) / 0.5e12
    p2p = 2 * 32 * m.d_model * 4 / 1e9  # activation forward, gradient back, fp32, within the node
    assert est["slowest_stage"] == 1
    assert est["step_time_s"] == pytest.approx(4 * (s1 + p2p) / (1 - 1 / 5))


def test_balanced_layout_beats_the_even_split():
    cfg = load_train_config(["model=deepseek_v3", "trainer.seq_len=4096"])
    n = cfg.model.num_layers
    layout = balanced_layout(cfg, 16)
    assert len(layout) == 16 and sum(layout) == n

    def worst(lay):
        start, out = 0, []
        for c, k in enumerate(lay):
            out.append(stage_flops_per_token(cfg, list(range(start, start + k)), last=c == len(lay) - 1))
            start += k
        return max(out)

    assert worst(layout) <= worst(even_layout(n, 16))


@pytest.mark.parametrize("flag,value", [("--compute-efficiency", "1.5"), ("--peak-tflops", "0"),
                                        ("--comm-overlap", "-0.1")])
def test_bad_hardware_flag_is_a_clear_error(flag, value, capsys):
    assert main(["model=tiny_mixtral", flag, value]) == 2
    assert f"{flag} " in capsys.readouterr().err
