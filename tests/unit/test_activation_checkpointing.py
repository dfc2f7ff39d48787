"""Activation checkpointing: `full` and `selective` give the loss, every gradient, the routing statistics and the
expert-bias loads of `none`; they keep less; eval, generation and bad names behave.

Models: tiny_mixtral (sliding-window GQA, softmax top-2), tiny_deepseek_v3 (MLA, sigmoid routing with the
expert bias, a dense first layer, an MTP module whose block is MoE), tiny_deepseek_moe (shared experts and a
dense first layer).
"""
from __future__ import annotations

import pytest
import torch

import parallel.activation_checkpointing as ac
from parallel.activation_checkpointing import apply_activation_checkpointing
from train.config import load_train_config
from train.model import build_model, new_kv_caches
from train.model.moe import update_expert_biases
from train.plan.measure import alive_tensor_bytes, saved_tensor_bytes
from train.trainer.validate import ConfigError, validate_config

MODELS = ("tiny_mixtral", "tiny_deepseek_v3", "tiny_deepseek_moe")
RTOL = 1e-6


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/unit/conftest.py


def _model(name: str, mode: str, seed: int = 0, *overrides: str):
    cfg = load_train_config([f"model={name}", *overrides]).model
    torch.manual_seed(seed)
    model = build_model(cfg).train()
    apply_activation_checkpointing(model, mode)
    return model


def _batch(model, b=2, t=16, seed=1):
    ids = torch.randint(0, model.cfg.vocab_size, (b, t + 1), generator=torch.Generator().manual_seed(seed))
    return ids[:, :-1], ids[:, 1:]


def _counting_reducers(model) -> list:
    """Install an identity `count_reducer` on every MoE layer that counts its calls."""
    calls = []

    def reduce(t):
        calls.append(t.shape)
        return t

    for _, layer in model.moe_layers():
        layer.count_reducer = reduce
    return calls


def _train_steps(model, steps=2):
    """fwd+bwd per step, then the bias update as the trainer does it; returns each step's (output, grads, loads)."""
    results = []
    for step in range(steps):
        x, y = _batch(model, seed=step)
        out = model(x, y)
        out.loss.backward()
        loads = [layer.expert_load_E.clone() for _, layer in model.moe_layers() if layer.expert_load_E is not None]
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((out, grads, loads))
        model.zero_grad(set_to_none=True)
        update_expert_biases(model)
    return results


def _assert_stats_equal(stats, ref):
    assert len(stats) == len(ref) > 0
    for s, r in zip(stats, ref):
        assert s.keys() == r.keys()
        for key, value in r.items():
            if torch.is_tensor(value):
                assert torch.equal(s[key], value), key
            else:
                assert s[key] == value, key


@pytest.mark.parametrize("mode", ["full", "selective"])
@pytest.mark.parametrize("name", MODELS)
def test_same_losses_gradients_stats_and_bias_loads_as_none(name, mode):
    ref_model, model = _model(name, "none"), _model(name, mode)
    ref_calls, calls = _counting_reducers(ref_model), _counting_reducers(model)
    for (out, grads, loads), (ref_out, ref_grads, ref_loads) in zip(_train_steps(model), _train_steps(ref_model)):
        for key in ("loss", "lm_loss", "aux_loss", "mtp_loss"):
            torch.testing.assert_close(getattr(out, key), getattr(ref_out, key), rtol=RTOL, atol=0, msg=key)
        assert out.aux_terms.keys() == ref_out.aux_terms.keys()
        for key, term in ref_out.aux_terms.items():
            torch.testing.assert_close(out.aux_terms[key], term, rtol=RTOL, atol=0, msg=key)
        assert grads.keys() == ref_grads.keys()
        for key, g_ref in ref_grads.items():
            assert g_ref.abs().max() > 0, key  # every parameter takes part
            torch.testing.assert_close(grads[key], g_ref, rtol=RTOL, atol=RTOL * g_ref.abs().max().item(), msg=key)
        _assert_stats_equal(out.moe_stats, ref_out.moe_stats)
        assert len(loads) == len(ref_loads)
        for load, ref_load in zip(loads, ref_loads):  # counted once, not again in the recompute
            assert torch.equal(load, ref_load)
    # the balance counts' reduction (an all-reduce under data parallelism) is not repeated by the recompute
    assert len(calls) == len(ref_calls) == 2 * len(list(ref_model.moe_layers()))
    if name == "tiny_deepseek_v3":
        biases = [(a.router.expert_bias_E, b.router.expert_bias_E) for (_, a), (_, b) in
                  zip(model.moe_layers(), ref_model.moe_layers())]
        assert all(torch.equal(a, b) and a.abs().sum() > 0 for a, b in biases)


def _with_router_jitter(model, scale=0.5):
    """Multiply the router's input by U(1 - s, 1 + s) noise (Switch's jitter), drawn from the global RNG."""
    for _, layer in model.moe_layers():
        plain = layer.router.forward

        def jittered(x_TD, plain=plain):
            return plain(x_TD * (1 + scale * (2 * torch.rand_like(x_TD) - 1)))

        layer.router.forward = jittered


def test_full_replays_router_noise():
    """The recompute draws the same noise as the first forward (checkpoint restores the RNG), so it routes the
    same tokens to the same experts and the gradients are those of `none`."""
    ref_model, model = _model("tiny_mixtral", "none"), _model("tiny_mixtral", "full")
    grads = []
    for m in (ref_model, model):
        _with_router_jitter(m)
        torch.manual_seed(5)
        m(*_batch(m)).loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for key, g_ref in grads[0].items():
        torch.testing.assert_close(grads[1][key], g_ref, rtol=RTOL, atol=RTOL * g_ref.abs().max().item(), msg=key)


def test_full_refuses_a_recompute_that_routes_differently():
    """A selection bias changed between forward and backward would route the recompute differently: an error
    naming the cause, never silently different gradients."""
    model = _model("tiny_deepseek_v3", "full", 0, "model.mtp_depth=0")
    out = model(*_batch(model))
    with torch.no_grad():
        for _, layer in model.moe_layers():
            layer.router.expert_bias_E.copy_(torch.linspace(10.0, -10.0, layer.num_experts))
    with pytest.raises(RuntimeError, match="routed tokens differently"):
        out.loss.backward()


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_eval_and_generation_bypass_checkpointing(mode, monkeypatch):
    ref_model, model = _model("tiny_deepseek_v3", "none").eval(), _model("tiny_deepseek_v3", mode).eval()
    x, y = _batch(model, t=10)

    def no_checkpoint(*args, **kwargs):
        raise AssertionError("checkpoint called without autograd or with a KV cache")

    def decode(m):
        caches = new_kv_caches(m)
        logits = torch.cat([m(x[:, :6], kv_caches=caches).logits] +
                           [m(x[:, t : t + 1], kv_caches=caches).logits for t in range(6, 10)], dim=1)
        assert all(c.length == 10 for c in caches)  # a recompute would have appended keys twice
        return logits.detach()

    with torch.no_grad():
        ref_out, ref_logits = ref_model(x, y), decode(ref_model)
        with monkeypatch.context() as patch:
            patch.setattr(ac, "checkpoint", no_checkpoint)
            out = model(x, y)
            assert torch.equal(out.logits, ref_out.logits) and torch.equal(out.loss, ref_out.loss)
            assert torch.equal(decode(model), ref_logits)
    # decoding with autograd recording: the blocks that take the cache run plainly (only FFNs may checkpoint)
    assert torch.equal(decode(model), ref_logits)


def test_bad_mode_is_a_clear_error():
    model = _model("tiny_mixtral", "none")
    with pytest.raises(ValueError, match=r"trainer.activation_checkpointing='partial'.*none, full, selective"):
        apply_activation_checkpointing(model, "partial")
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match=r"activation_checkpointing=partial.*none, full, selective"):
        load_train_config(["trainer.activation_checkpointing=partial"])  # an enum: refused at composition
    cfg = load_train_config([])
    cfg.trainer.activation_checkpointing = "partial"  # built by hand: the schema's validate() refuses it
    with pytest.raises(ConfigError, match=r"trainer.activation_checkpointing='partial'.*none, full, selective"):
        validate_config(cfg, world_size=1)
    for mode in ("none", "full", "selective"):
        validate_config(load_train_config([f"trainer.activation_checkpointing={mode}"]), world_size=1)
    apply_activation_checkpointing(model, "full")
    with pytest.raises(RuntimeError, match="already applied"):
        apply_activation_checkpointing(model, "full")


@pytest.mark.parametrize("name", ["tiny_mixtral", "tiny_deepseek_v3"])
def test_saved_activation_bytes_full_below_selective_below_none(name):
    """Trainer defaults per micro-batch (4 sequences of 128 tokens), fp32. `-s` prints the figures. Autograd-saved
    bytes miss what `selective` keeps in its own cache; the storages alive after the forward count it."""
    measured = {}
    for mode in ("none", "selective", "full"):
        model = _model(name, mode)
        x, y = _batch(model, b=4, t=128)
        measured[mode] = saved_tensor_bytes(model, x, y), alive_tensor_bytes(model, x, y)
    for mode, (packed, live) in measured.items():
        print(f"{name} {mode}: autograd-saved {packed / 2**20:.2f} MiB, alive after forward {live / 2**20:.2f} MiB")
    for i in (0, 1):
        assert measured["full"][i] < measured["selective"][i] < measured["none"][i]
    # selective's own cache is real memory: counted by liveness, invisible to the hooks
    assert measured["selective"][1] > measured["selective"][0]
    assert measured["none"][1] == pytest.approx(measured["none"][0], rel=0.01)


@pytest.mark.parametrize("mode", ["full", "selective"])
@pytest.mark.parametrize("name", ["tiny_noisy_topk", "tiny_switch", "tiny_gshard", "tiny_expert_choice", "tiny_base",
                                  "tiny_hash"])
def test_routing_schemes_recompute_the_same_plan(name, mode):
    """`full` recomputes every router: noisy ones (noisy_topk, Switch jitter, GShard's random second expert) draw
    the same noise from the restored RNG, the assignment schemes are deterministic, so losses and gradients match
    `none` and the recorded counts replay without the routing-changed error."""
    ref_model, model = _model(name, "none", 0, "model.num_layers=2"), _model(name, mode, 0, "model.num_layers=2")
    results = []
    for m in (model, ref_model):
        torch.manual_seed(7)
        results.append(_train_steps(m))
    for (out, grads, _), (ref_out, ref_grads, _) in zip(*results):
        for key in ("loss", "lm_loss", "aux_loss"):
            torch.testing.assert_close(getattr(out, key), getattr(ref_out, key), rtol=RTOL, atol=0, msg=key)
        for key, g_ref in ref_grads.items():
            torch.testing.assert_close(grads[key], g_ref, rtol=RTOL, atol=RTOL * g_ref.abs().max().item() + 1e-12,
                                       msg=key)
