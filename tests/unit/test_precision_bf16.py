"""`precision=bf16` (train/precision/bf16.py): bf16 compute end to end over fp32 masters, on tiny models in one CPU
process. What runs in bf16 and what stays fp32; one cast per optimizer step; losses that track fp32's (and
bf16_autocast's); an exact resume; the planner's bound on its activations; accepted at every ZeRO stage."""
from __future__ import annotations


import pytest
import torch

from parallel import Mesh
from train.build import EngineArgs, build_model
from train.config import load_train_config
from train.config.errors import ConfigError
from train.model.moe.experts import GroupedExperts
from train.model.moe.router import Router
from tests.small_runs import records, run
from train.trainer.validate import validate_config

BF16, FP32 = torch.bfloat16, torch.float32
@pytest.fixture(scope="module")
def cache_dir(small_cache):
    return small_cache  # the session's (tests/conftest.py)


def _built(model: str = "tiny_deepseek_v3", *overrides: str, accum_steps: int = 2):
    cfg = load_train_config([f"model={model}", "model.vocab_size=256", "precision=bf16", *overrides])
    return build_model(cfg, Mesh(), init_seed=3, engine_args=EngineArgs(accum_steps=accum_steps))


@pytest.mark.parametrize("checkpointing", ["none", "full"])
def test_dtypes_of_a_bf16_training_step(checkpointing, one_thread):
    """tiny_deepseek_v3 (MLA, a dense first layer, sigmoid routing with the V3 bias, MTP), two micro-batches."""
    built = _built("tiny_deepseek_v3", f"trainer.activation_checkpointing={checkpointing}")
    model, engine = built.model, built.engine
    seen: dict[str, set] = {"block_in": set(), "linear_w": set(), "expert_w": set(), "router": set()}
    for block in model.blocks():  # the residual stream entering every block, MTP's included
        block.register_forward_pre_hook(lambda m, args: seen["block_in"].add(args[0].dtype))
    routers = [m for m in model.modules() if isinstance(m, Router)]
    gates = {id(m) for r in routers for m in r.modules()}
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and id(m) not in gates:  # a bf16 output means a bf16 weight and input
            m.register_forward_hook(lambda m, args, out: seen["linear_w"].add(out.dtype))
        if isinstance(m, GroupedExperts):
            gemm = m.gemm
            m.gemm = lambda x, w, n, gemm=gemm: (seen["expert_w"].add((x.dtype, w.dtype)), gemm(x, w, n))[1]
    for r in routers:
        r.register_forward_hook(lambda m, args, out: seen["router"].update(
            {out.logits_TE.dtype, out.scores_TE.dtype, out.topk_weights_TK.dtype}))

    ids = torch.randint(0, 256, (3, 2, 16), generator=torch.Generator().manual_seed(0))
    copies = []
    for i in range(2):
        out = engine.forward(ids[i], ids[i + 1])
        assert out.logits.dtype == BF16 and out.loss.dtype == FP32
        assert all(t.dtype == FP32 for t in out.aux_terms.values()) and out.aux_loss.dtype == FP32
        engine.backward(out.loss)
        copies.append(model.layers[0].attn.o_proj.weight._compute_copy[1])
    assert copies[0] is copies[1]  # cast once per optimizer step, shared by the micro-batches
    assert seen == {"block_in": {BF16}, "linear_w": {BF16}, "expert_w": {(BF16, BF16)}, "router": {FP32}}
    assert all(p.dtype == FP32 and p.grad.dtype == FP32 for p in model.parameters())  # masters, main grads
    for r in routers:
        assert r.gate.weight.dtype == FP32 and r.expert_bias_E.dtype == FP32
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert not engine.step().skipped
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    opt = engine.optimizer
    assert all(p.dtype == FP32 for g in opt.param_groups for p in g["params"])
    assert all(s["exp_avg"].dtype == FP32 and s["exp_avg_sq"].dtype == FP32 for s in opt.state.values())
    engine.forward(ids[0], ids[1])
    assert model.layers[0].attn.o_proj.weight._compute_copy[1] is not copies[0]  # the update is cast anew


def test_micro_batch_gradients_accumulate_in_fp32(one_thread):
    """The masters' gradient after two micro-batches is the fp32 sum of the two bf16 weight gradients."""
    built = _built("tiny_mixtral", accum_steps=1)
    model, engine = built.model, built.engine
    w = model.layers[0].attn.q_proj.weight
    ids = torch.randint(0, 256, (3, 2, 16), generator=torch.Generator().manual_seed(1))
    grads = []
    for i in range(2):
        engine.backward(engine.forward(ids[i], ids[i + 1]).loss)
        grads.append(w.grad.clone())
    assert grads[0].dtype == FP32
    single = grads[0]
    step_two = grads[1] - single
    assert step_two.abs().sum() > 0
    # each micro-batch's contribution is a bf16 tensor converted to fp32, the sum is not rounded to bf16
    assert torch.equal(single, single.to(BF16).float())
    assert not torch.equal(grads[1], grads[1].to(BF16).float())


@pytest.mark.parametrize("model", ["tiny_mixtral", "tiny_deepseek_v3"])
def test_bf16_tracks_fp32_and_bf16_autocast(model, tmp_path, cache_dir):
    common = [f"model={model}", "trainer.max_steps=4"]
    runs = {}
    for p in ("fp32", "bf16", "bf16_autocast"):
        run(tmp_path / p, cache_dir, *common, f"precision={p}")
        runs[p] = records(tmp_path / p)
    for ref, bf16, auto in zip(runs["fp32"], runs["bf16"], runs["bf16_autocast"]):
        assert bf16["lm_loss"] == pytest.approx(ref["lm_loss"], rel=2e-2)
        assert auto["lm_loss"] == pytest.approx(ref["lm_loss"], rel=2e-2)
        assert bf16["lm_loss"] != ref["lm_loss"] and bf16["lm_loss"] != auto["lm_loss"]  # three computations


def test_bf16_resume_is_exact(tmp_path, cache_dir):
    """The checkpoint holds the fp32 masters (never the bf16 copies): the resumed run casts the same copies."""
    common = ["model=tiny_deepseek_v3", "precision=bf16", "trainer.max_steps=4", "trainer.save_every=2"]
    full = run(tmp_path / "full", cache_dir, *common)
    run(tmp_path / "split", cache_dir, *common, stop_at=2)
    resumed = run(tmp_path / "split", cache_dir, *common)
    assert resumed.resumed_from.name == "step_00000002"
    ref, got = records(tmp_path / "full"), records(tmp_path / "split")
    for key in ("loss", "lm_loss", "aux_loss", "mtp_loss", "grad_norm"):
        assert [r[key] for r in got] == [r[key] for r in ref], key
    sd_full, sd_resumed = full.state.model.state_dict(), resumed.state.model.state_dict()
    assert all(t.dtype == FP32 for t in sd_full.values() if t.is_floating_point())
    for name, t in sd_full.items():
        assert torch.equal(sd_resumed[name], t), name


@pytest.mark.parametrize("model", ["tiny_mixtral", "tiny_deepseek_v3"])
def test_planned_activations_bound_what_bf16_saves(model, one_thread):
    """What bf16 saves stays within bf16_autocast's planned figures (its residual stream and norm outputs are bf16
    where autocast keeps them fp32); tests/unit/test_plan.py checks bf16's own plan against it."""
    from train.plan.activations import Shapes, activation_bytes
    from train.plan.measure import saved_tensor_bytes

    ids = torch.randint(0, 256, (2, 65), generator=torch.Generator().manual_seed(2))
    measured = {}
    for precision in ("bf16", "bf16_autocast"):
        cfg = load_train_config([f"model={model}", "model.vocab_size=256", f"precision={precision}"])
        m = build_model(cfg, Mesh(), init_seed=3, stop_after="load").model
        dtype = BF16 if precision == "bf16_autocast" else None
        measured[precision] = saved_tensor_bytes(m, ids[:, :-1], ids[:, 1:], dtype)
    planned = activation_bytes(cfg.model, Shapes(2, 64, True, device_type="cpu"))["by_mode"]["none"]
    assert measured["bf16"] < measured["bf16_autocast"] <= planned * 1.1
    assert measured["bf16"] <= planned


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_with_zero_is_accepted(stage):
    """ZeRO 1-3 run `precision=bf16` (tests/distributed/test_zero.py checks they follow stage 0)."""
    cfg = load_train_config(["model=tiny_mixtral", "precision=bf16", f"parallel.zero_stage={stage}",
                             "trainer.global_batch_size=8", "trainer.micro_batch_size=4"])
    validate_config(cfg, world_size=2)


def test_compute_copy_follows_the_version_counter_and_skips_gathered_parameters():
    """What the ZeRO engine relies on: a parameter written behind autograd's back (ZeRO-1/2 update a flat buffer it
    views) is recast once its version counter is advanced; a parameter gathered per use (ZeRO-3) is never cached."""
    from train.precision.bf16 import compute_weight

    flat = torch.zeros(8)
    p = torch.nn.Parameter(torch.zeros(4))
    p.data = flat[:4]
    assert compute_weight(p).sum().item() == 0
    flat.add_(1)
    assert compute_weight(p).sum().item() == 0  # stale: neither storage nor version moved
    torch.autograd.graph.increment_version(p)
    assert compute_weight(p).sum().item() == 4
    q = torch.nn.Parameter(torch.ones(4))
    q.gathered_per_use = True
    w = compute_weight(q)
    assert w.dtype == torch.bfloat16 and not hasattr(q, "_compute_copy")
    w.sum().backward()
    assert q.grad.dtype == torch.float32 and q.grad.sum().item() == 4
