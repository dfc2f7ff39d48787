"""Each routing scheme against its paper's formula, on hand-made inputs (gate = identity, so logits = x).

Shape legend: T tokens, E routed experts (= D, the model dim, here), K plan slots per token.
"""
import math

import pytest
import torch

from tests.expert_ref import expert_ffn
from train.config.model import AttentionConfig, ModelConfig, MoEConfig
from train.model.moe import MoELayer
from train.model.moe.router import BalanceInputs, Router
from train.model.moe.routers import ROUTERS, build_router
from train.model.moe.schemes_assign import balanced_rounding, hash_experts, sinkhorn_assign
from train.model.moe.schemes_token import cv_squared, prob_in_top_k
from train.model.transformer import build_model, new_kv_caches

E = 4


def _cfg(**kw) -> MoEConfig:
    return MoEConfig(**{"num_experts": E, "top_k": 2, "expert_hidden": 8, **kw})


def _identity_router(**kw) -> Router:
    r = build_router(E, _cfg(**kw))
    if hasattr(r, "gate"):
        with torch.no_grad():
            r.gate.weight.copy_(torch.eye(E))
    return r


def _phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def test_build_router_by_name():
    for name, cls in ROUTERS.items():
        k = 1 if name in ("switch", "base", "hash") else 2
        assert type(build_router(E, _cfg(router=name, top_k=k))) is cls
    with pytest.raises(ValueError, match="model.moe.router"):
        build_router(E, _cfg(router="nope"))


# ---- noisy top-k (Shazeer et al. 2017) ----

def test_prob_in_top_k_by_hand():
    clean = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    noisy = torch.tensor([[2.5, 0.5, 1.0, -1.0]])  # top 2 = {0, 2}; 3rd largest 0.5, 2nd largest 1.0
    got = prob_in_top_k(clean, noisy, torch.ones(1, 4), 2)
    want = [_phi((2 - 0.5) / 1), _phi(1 - 1.0), _phi(0 - 0.5), _phi(-1 - 1.0)]
    assert torch.allclose(got, torch.tensor([want]), atol=1e-6)


def test_cv_squared():
    assert torch.isclose(cv_squared(torch.tensor([1.0, 2.0, 3.0])), torch.tensor((2 / 3) / 4))


def test_noisy_topk_eval_is_softmax_of_the_clean_top_k():
    r = _identity_router(router="noisy_topk").eval()
    out = r(torch.tensor([[2.0, 1.0, 0.0, -1.0]]))
    assert out.topk_ids_TK.tolist() == [[0, 1]]
    assert torch.allclose(out.topk_weights_TK, torch.tensor([2.0, 1.0]).softmax(-1))


def test_noisy_topk_training_noise_and_losses():
    r = _identity_router(router="noisy_topk", importance_coef=0.1, load_coef=0.2).train()
    torch.nn.init.zeros_(r.noise.weight)  # noise std softplus(0) = ln 2
    x = torch.randn(6, E, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    out = r(x)
    torch.manual_seed(5)
    noisy = x + torch.randn(6, E) * (math.log(2.0) + 1e-9)
    vals, ids = noisy.topk(2, dim=-1)
    assert torch.equal(out.topk_ids_TK, ids)
    assert torch.allclose(out.topk_weights_TK, vals.softmax(-1))
    gates = torch.zeros(6, E).scatter(1, ids, vals.softmax(-1))
    load = prob_in_top_k(x, noisy, torch.full((6, E), math.log(2.0) + 1e-9), 2).sum(0)
    aux = r.balance_terms(out, BalanceInputs(torch.zeros(E), torch.tensor(6.0), torch.zeros(1), 1, 1))
    assert torch.allclose(aux["importance"], 0.1 * gates.sum(0).var(unbiased=False) / gates.sum(0).mean() ** 2)
    assert torch.allclose(aux["load"], 0.2 * load.var(unbiased=False) / load.mean() ** 2, atol=1e-6)
    aux["load"].backward()
    assert r.noise.weight.grad.abs().sum() > 0  # the learned noise is trained by the load loss


# ---- Switch (Fedus et al. 2021) ----

def test_switch_top1_gate_is_the_probability_and_jitter_only_in_training():
    r = _identity_router(router="switch", top_k=1, jitter_eps=0.1)
    x = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 0.0]])
    out = r.eval()(x)
    assert out.topk_ids_TK.tolist() == [[0], [2]]
    assert torch.allclose(out.topk_weights_TK, x.softmax(-1).amax(-1, keepdim=True))
    r.train()
    torch.manual_seed(3)
    got = r(x)
    torch.manual_seed(3)
    xj = x * torch.empty_like(x).uniform_(0.9, 1.1)
    assert torch.allclose(got.scores_TE, xj.softmax(-1))
    with pytest.raises(ValueError, match="top_k=1"):
        build_router(E, _cfg(router="switch", top_k=2))


# ---- GShard (Lepikhin et al. 2020) ----

def test_gshard_normalised_top2_and_random_second_expert():
    r = _identity_router(router="gshard")
    x = torch.tensor([[3.0, 0.0, -5.0, -5.0], [1.0, 1.2, 0.0, 0.0]] * 8)
    p = x.softmax(-1)
    g2 = torch.stack([p[:, 1] / (p[:, 0] + p[:, 1]), p[:, 0] / (p[:, 0] + p[:, 1])])  # second weights, per row kind
    out = r.eval()(x)
    assert out.topk_ids_TK[:2].tolist() == [[0, 1], [1, 0]]
    assert torch.allclose(out.topk_weights_TK.sum(-1), torch.ones(16))
    torch.manual_seed(0)
    got = r.train()(x)
    torch.manual_seed(0)
    u = torch.rand(16)
    second = torch.where(torch.arange(16) % 2 == 0, g2[0, :], g2[1, :])
    keep = u < 2 * second
    assert torch.equal(got.topk_ids_TK[:, 1] >= 0, keep)
    assert torch.allclose(got.topk_weights_TK[:, 1], torch.where(keep, second, 0.0))


def test_gshard_capacity_and_balance_term():
    torch.manual_seed(0)
    layer = MoELayer(E, _cfg(router="gshard", capacity_factor=1.0, expert_balance_coef=1.0))
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.eye(E))
    x = torch.tensor([[3.0, 2.0, 0.0, 0.0]]).repeat(8, 1) + 0.01 * torch.randn(8, E)
    layer.eval()
    _, out = layer(x.view(1, 8, E))
    # capacity 2T/E = 4: experts 0 and 1 keep 4 of their 8 tokens each
    assert out.stats["dropped_frac"].item() == pytest.approx(8 / 16)
    p = x.softmax(-1)
    c = torch.zeros(E).scatter_add_(0, p.argmax(-1), torch.ones(8))
    want = (c / 8 * p.mean(0)).sum() / E
    assert torch.allclose(out.aux_terms["expert_balance"], want)


# ---- ST-MoE: evaluation capacity ----

def test_eval_capacity_factor():
    r = _identity_router(capacity_factor=1.25, eval_capacity_factor=2.0)
    assert r.train().capacity_factor() == 1.25 and r.eval().capacity_factor() == 2.0
    assert _identity_router(capacity_factor=1.25).eval().capacity_factor() == 1.25


# ---- Expert Choice (Zhou et al. 2022) ----

def test_expert_choice_each_expert_takes_its_top_c_tokens():
    r = _identity_router(router="expert_choice", top_k=1)  # C = ceil(T K / E) = 2 of T = 8
    x = torch.randn(8, E, generator=torch.Generator().manual_seed(0))
    out = r(x)
    s = x.softmax(-1)
    for e in range(E):
        picked = set(s[:, e].topk(2).indices.tolist())
        assert {t for t in range(8) if out.topk_ids_TK[t, e] == e} == picked
        assert all(out.topk_ids_TK[t, e] == -1 for t in range(8) if t not in picked)
    assert torch.allclose(out.topk_weights_TK, torch.where(out.topk_ids_TK >= 0, s, 0.0))
    assert torch.equal(r(x).topk_ids_TK, out.topk_ids_TK)  # deterministic (recompute-safe)


def test_expert_choice_layer_output_is_the_score_weighted_sum():
    torch.manual_seed(0)
    layer = MoELayer(E, _cfg(router="expert_choice", top_k=1))
    x = torch.randn(1, 8, E)
    y, _ = layer(x)
    route = layer.router(x[0])
    want = torch.zeros(8, E)
    for t in range(8):
        for e in range(E):
            if route.topk_ids_TK[t, e] == e:
                ex = layer.experts
                want[t] += route.topk_weights_TK[t, e] * expert_ffn(ex, e, x[0, t])
    assert torch.allclose(y[0], want, atol=1e-6)


def test_expert_choice_refuses_kv_cache_decoding():
    cfg = ModelConfig(vocab_size=32, d_model=16, num_layers=1, dense_hidden=16,
                      attention=AttentionConfig(num_heads=2, num_kv_heads=2),
                      moe=MoEConfig(num_experts=4, top_k=1, expert_hidden=8, router="expert_choice"))
    model = build_model(cfg)
    model(torch.zeros(1, 4, dtype=torch.long))  # training-style forward works
    with pytest.raises(ValueError, match="expert_choice.*cannot decode one token at a time"):
        model(torch.zeros(1, 1, dtype=torch.long), kv_caches=new_kv_caches(model))
    from train.generate import generate_ids
    with pytest.raises(ValueError, match="generation and KV-cache forwards are not supported"):
        generate_ids(model, [1, 2, 3], 2)


# ---- BASE layers (Lewis et al. 2021) ----

def test_sinkhorn_assignment_balances_by_hand():
    scores = torch.tensor([[3.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.5, 0.0]])  # all prefer expert 0
    assert sinkhorn_assign(scores, 50).tolist() == [0, 0, 1, 1]  # the strongest preferences win it


def test_balanced_rounding_by_hand():
    value = torch.tensor([[5.0, 1.0, 0.0], [4.0, 3.0, 0.0], [3.0, 2.0, 1.0], [0.0, 9.0, 1.0], [1.0, 8.0, 0.0],
                          [2.0, 7.0, 0.0]])
    # round 1: tokens 0,1,2 propose expert 0, which takes 0 and 1; 3,4,5 propose 1, which takes 3 and 4.
    # round 2: token 2 proposes 1 and token 5 proposes 0, both full: rejected. round 3: both propose 2, accepted.
    assert balanced_rounding(value, 2).tolist() == [0, 0, 2, 1, 1, 2]


def test_base_balanced_in_training_greedy_at_eval():
    r = _identity_router(router="base", top_k=1, sinkhorn_iters=50)
    x = torch.randn(64, E, generator=torch.Generator().manual_seed(0)) + torch.tensor([2.0, 0.0, 0.0, 0.0])
    out = r.train()(x)
    counts = torch.bincount(out.topk_ids_TK[:, 0], minlength=E)
    assert counts.tolist() == [16] * E  # exactly T/E each
    assert torch.allclose(out.topk_weights_TK, x.gather(1, out.topk_ids_TK).sigmoid())
    assert not r.causal
    ev = r.eval()(x)
    assert torch.equal(ev.topk_ids_TK[:, 0], x.argmax(-1)) and r.causal


# ---- hash layers (Roller et al. 2021) ----

def test_hash_routes_on_token_ids_by_the_fixed_formula():
    ids = torch.tensor([0, 1, 2, 3, 1000, 8191])
    assert hash_experts(ids, 8).tolist() == [((i * 2654435761) % 2**32) % 8 for i in ids.tolist()]
    assert hash_experts(torch.tensor([1, 2]), 8).tolist() == [1, 2]
    torch.manual_seed(0)
    layer = MoELayer(E, _cfg(router="hash", top_k=1))
    assert not list(layer.router.parameters())  # no learned router
    x, tok = torch.randn(1, 6, E), torch.tensor([[0, 1, 2, 3, 4, 5]])
    y, _ = layer(x, tok)
    ex = layer.experts
    for t in range(6):
        e = int(hash_experts(tok[0, t], E))
        assert torch.allclose(y[0, t], expert_ffn(ex, e, x[0, t]), atol=1e-6)
    with pytest.raises(ValueError, match="token ids"):
        layer(x)
