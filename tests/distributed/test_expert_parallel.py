"""Expert parallelism end to end against a single-process reference on the same global batch.

Every rank builds the same seeded tiny DeepSeek-V3-style model (MLA, sigmoid routing, shared expert, bias
balancing, one MTP module whose block is also MoE) twice: a reference that processes the GLOBAL batch on one
rank (with `num_devices` = ep_size so device/comm balance terms see the same expert→device map), and a copy
that `parallelize` makes expert-parallel and that processes only this rank's slice. Compared: logits, every
loss term (mean over ranks vs reference), global load counts, every gradient after `reduce_gradients`
(expert gradients against the reference's slice), the clipped gradients, and the parameters after 3 AdamW
steps with expert-bias updates in between; with expert parallelism, a copy whose shared expert runs after the
combine instead of during it (`parallel.overlap=false`) gives bit-identical losses and gradients. Where a case names an activation-checkpointing mode, a third copy
recomputes its blocks in backward and must match the expert-parallel model exactly: under `full` the recompute
runs the dispatch all-to-alls again inside backward, on every rank in the same order.
"""
import pytest
import torch

from tests.distributed._spawn import run_distributed

B_LOCAL, S = 2, 8
ATOL = RTOL = 1e-5


def make_cfg(ep_size: int, device_limit=None, checkpointing="none", overlap=True):
    from train.config import load_train_config

    o = ["model=tiny_deepseek_v3", f"parallel.ep_size={ep_size}", f"parallel.overlap={str(overlap).lower()}",
         "trainer.device=cpu", "model.vocab_size=96",
         "model.d_model=48", "model.num_layers=2", "model.dense_hidden=64", "model.moe.expert_hidden=16",
         "model.moe.expert_balance_coef=0.01", "model.moe.device_balance_coef=0.02",
         "model.moe.comm_balance_coef=0.03", "model.moe.seq_balance_coef=0.01", "model.moe.z_loss_coef=0.001",
         f"trainer.activation_checkpointing={checkpointing}"]
    if device_limit is not None:  # device-limited routing replaces group-limited routing
        o += ["model.moe.num_groups=1", "model.moe.topk_groups=1", f"model.moe.device_limit={device_limit}"]
    return load_train_config(o)


def build(cfg, seed=0):
    from train.model import build_model

    torch.manual_seed(seed)
    return build_model(cfg.model)


def batch(world_size, step):
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, 96, (B_LOCAL * world_size, S + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def _mean_over_ranks(t, mesh):
    from parallel import all_reduce_stats

    return all_reduce_stats(t.detach().reshape(1), mesh)[0] / mesh.world_size


def _ref_grad(ref_params, name, p):
    g = ref_params[name].grad
    return g if g.shape == p.shape else None


def _check_same_as_without_checkpointing(model_ac, model, out, x, y):
    """`model_ac` (blocks recomputed in backward) against `model` on this rank's slice, before any reduction:
    every loss term, the routing statistics, the expert-bias loads and every local gradient."""
    out_ac = model_ac(x, y)
    out_ac.loss.backward()
    for name in ("loss", "lm_loss", "aux_loss", "mtp_loss"):
        torch.testing.assert_close(getattr(out_ac, name), getattr(out, name), atol=0, rtol=1e-6, msg=name)
    for st_ac, st in zip(out_ac.moe_stats, out.moe_stats, strict=True):
        for key in ("tokens_per_expert_E", "tokens_received_per_device_G", "a2a_tokens_sent"):
            assert torch.equal(torch.as_tensor(st_ac[key]), torch.as_tensor(st[key])), key
    for (_, a), (_, b) in zip(model_ac.moe_layers(), model.moe_layers()):
        assert torch.equal(a.expert_load_E, b.expert_load_E)  # counted once, not again in the recompute
    for (name, p_ac), p in zip(model_ac.named_parameters(), model.parameters()):
        torch.testing.assert_close(p_ac.grad, p.grad, atol=1e-7, rtol=1e-6, msg=f"checkpointed grad {name}")


def _check_against_reference(rank, world_size, ep_size, device_limit, checkpointing="none"):
    from parallel import clip_grad_norm_, init_distributed, parallelize, reduce_gradients, all_reduce_stats
    from parallel.dispatcher import AllToAllDispatcher
    from train.model.moe.bias import update_expert_biases
    from train.model.moe.experts import GroupedExperts

    cfg = make_cfg(ep_size, device_limit)
    mesh = init_distributed(cfg)
    ref = build(cfg)
    for _, layer in ref.moe_layers():
        layer.num_devices = ep_size
    model = parallelize(build(cfg), cfg, mesh)
    cfg_ac = make_cfg(ep_size, device_limit, checkpointing)
    model_ac = parallelize(build(cfg_ac), cfg_ac, mesh) if checkpointing != "none" else None
    layers = list(model.moe_layers())
    assert len(layers) == 2  # the main MoE block and the MTP block
    for _, layer in layers:
        assert layer.num_devices == ep_size
        assert layer.experts.w_down_EDF.shape[0] == cfg.model.moe.num_routed_experts // ep_size
        assert isinstance(layer.dispatcher, AllToAllDispatcher) == (ep_size > 1)
    mine = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    ref_params = dict(ref.named_parameters())
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)

    def expert_slice(name, t):
        mod = model.get_submodule(name.rsplit(".", 1)[0])
        if isinstance(mod, GroupedExperts):
            local = mod.placement.local_range
            return t[local.start : local.stop]
        return t

    for step in range(3):
        x, y = batch(world_size, step)
        out_ref = ref(x, y)
        out = model(x[mine], y[mine])
        out_ref.loss.backward()
        out.loss.backward()
        if model_ac is not None:
            _check_same_as_without_checkpointing(model_ac, model, out, x[mine], y[mine])
        if step == 0 and ep_size > 1:  # the shared expert overlapped with the combine, or run after it: the same
            serial = parallelize(build(make_cfg(ep_size, device_limit, overlap=False)),
                                 make_cfg(ep_size, device_limit, overlap=False), mesh)
            assert all(not layer.dispatcher.overlap for _, layer in serial.moe_layers())
            assert all(layer.dispatcher.overlap for _, layer in model.moe_layers())
            out_serial = serial(x[mine], y[mine])
            out_serial.loss.backward()
            assert torch.equal(out_serial.loss, out.loss)
            for (name, a), b in zip(serial.named_parameters(), model.parameters()):
                assert torch.equal(a.grad, b.grad), name

        if step == 0:
            torch.testing.assert_close(out.logits, out_ref.logits[mine], atol=ATOL, rtol=RTOL)
            for name in ("loss", "lm_loss", "aux_loss", "mtp_loss"):
                torch.testing.assert_close(_mean_over_ranks(getattr(out, name), mesh), getattr(out_ref, name),
                                           atol=ATOL, rtol=RTOL, msg=name)
            assert set(out.aux_terms) == set(out_ref.aux_terms)
            for name, term in out_ref.aux_terms.items():
                assert term.abs() > 0, name  # every balance term is active in this test
                torch.testing.assert_close(_mean_over_ranks(out.aux_terms[name], mesh), term,
                                           atol=ATOL, rtol=RTOL, msg=name)
            for st, st_ref in zip(out.moe_stats, out_ref.moe_stats):  # count_reducer makes loads global
                torch.testing.assert_close(st["tokens_per_expert_E"], st_ref["tokens_per_expert_E"])

        reduce_gradients(model, mesh)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, expert_slice(name, ref_params[name].grad), atol=ATOL, rtol=RTOL,
                                       msg=f"grad {name} step {step}")
        norm_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        norm = clip_grad_norm_(model, 0.05, mesh)
        assert norm_ref > 0.05  # clipping is active
        torch.testing.assert_close(norm, norm_ref, atol=ATOL, rtol=RTOL)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, expert_slice(name, ref_params[name].grad), atol=ATOL, rtol=RTOL,
                                       msg=f"clipped grad {name}")
        opt_ref.step(), opt.step()
        opt_ref.zero_grad(), opt.zero_grad()
        update_expert_biases(ref)
        update_expert_biases(model, reduce=lambda t: all_reduce_stats(t, mesh))
        if model_ac is not None:  # follow the updated weights and biases; start the next step's loads afresh
            model_ac.load_state_dict(model.state_dict())
            model_ac.zero_grad()
            for _, layer in model_ac.moe_layers():
                layer.expert_load_E.zero_()

    for name, p in model.named_parameters():
        torch.testing.assert_close(p, expert_slice(name, ref_params[name]), atol=ATOL, rtol=RTOL, msg=name)
    for (_, a), (_, b) in zip(model.moe_layers(), ref.moe_layers()):
        torch.testing.assert_close(a.router.expert_bias_E, b.router.expert_bias_E)
        assert a.router.expert_bias_E.abs().sum() > 0


@pytest.mark.parametrize(
    "world_size,ep_size,device_limit,checkpointing",
    [(2, 1, None, "none"), (2, 2, None, "full"), (4, 2, None, "none"), (4, 4, None, "none"), (4, 4, 2, "selective"),
     (4, 2, 1, "none")],
)
def test_matches_single_process_reference(world_size, ep_size, device_limit, checkpointing):
    run_distributed(_check_against_reference, world_size, ep_size, device_limit, checkpointing)
