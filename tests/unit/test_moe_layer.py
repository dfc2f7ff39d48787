"""MoELayer against a naive per-token loop; capacity, granularity and the aux-loss-free bias.

Shape legend: B batch, S sequence, T tokens, D model dim, E experts, K active experts.
"""
import pytest
import torch

from tests.expert_ref import expert_ffn
from train.config.model import MoEConfig
from train.model.mlp import SwiGLU
from train.model.moe import (
    MoELayer,
    device_capacity,
    drop_over_capacity,
    drop_over_device_capacity,
    expert_capacity,
    update_expert_bias,
    update_expert_biases,
)
from train.trainer.metrics import imbalance

D = 16


def _layer(seed=0, **kw) -> MoELayer:
    torch.manual_seed(seed)
    cfg = MoEConfig(**{"num_experts": 8, "top_k": 2, "expert_hidden": 8, **kw})
    layer = MoELayer(D, cfg, init_std=0.3)
    return layer


def _expert(layer, e, x_D):
    return expert_ffn(layer.experts, e, x_D)


def _naive(layer, x_BTD, ids_TK=None):
    x_TD = x_BTD.reshape(-1, D)
    r = layer.router(x_TD)
    ids_TK = r.topk_ids_TK if ids_TK is None else ids_TK
    out = []
    for t in range(x_TD.shape[0]):
        y = torch.zeros(D)
        for k in range(ids_TK.shape[1]):
            e = int(ids_TK[t, k])
            if e >= 0:
                y = y + r.topk_weights_TK[t, k] * _expert(layer, e, x_TD[t])
        if layer.shared is not None:
            y = y + layer.shared(x_TD[t])
        out.append(y)
    return torch.stack(out).view_as(x_BTD)


@pytest.mark.parametrize(
    "kw",
    [
        dict(scoring="topk_softmax"),
        dict(scoring="softmax_topk", num_shared_experts=2, routed_scaling_factor=16.0),
        dict(scoring="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5, num_shared_experts=1,
             num_groups=4, topk_groups=2, group_score="top2_sum", bias_update_rate=1e-3),
        dict(scoring="softmax_topk", granularity=2),
    ],
)
@torch.no_grad()
def test_layer_matches_naive_loop(kw):
    layer = _layer(**kw)
    x = torch.randn(2, 5, D)
    y, out = layer(x)
    assert torch.allclose(y, _naive(layer, x), atol=1e-5)
    assert out.stats["dropped_frac"] == 0.0
    assert out.stats["tokens_per_expert_E"].sum() == 10 * layer.top_k


@torch.no_grad()
def test_capacity_drops_pass_through_as_zero():
    layer = _layer(capacity_factor=0.5)
    x = torch.randn(2, 8, D)
    y, out = layer(x)
    r = layer.router(x.view(-1, D))
    kept = drop_over_capacity(r.topk_ids_TK, 8, expert_capacity(16, 2, 8, 0.5))
    assert (kept < 0).any()
    assert torch.allclose(y, _naive(layer, x, kept), atol=1e-5)
    assert out.stats["dropped_frac"].item() == pytest.approx((kept < 0).float().mean().item())
    fully_dropped = (kept < 0).all(-1)
    assert torch.equal(y.view(-1, D)[fully_dropped], torch.zeros(int(fully_dropped.sum()), D))


def test_gradients_reach_all_parts():
    layer = _layer(num_shared_experts=1, expert_balance_coef=0.01)
    y, out = layer(torch.randn(2, 5, D))
    (y.square().sum() + out.aux_terms["expert_balance"]).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("shared", [0, 1, 2])
def test_granularity_keeps_total_and_active_params(shared):
    def counts(m):
        moe = MoEConfig(num_experts=8, top_k=2, expert_hidden=64, num_shared_experts=shared, granularity=m)
        layer = MoELayer(D, moe)
        assert layer.experts.num_experts == moe.num_routed_experts
        assert layer.experts.w_gate_up_EHD.shape == (moe.num_routed_experts, 2 * moe.routed_hidden, D)
        routed = sum(p.numel() for p in layer.experts.parameters())
        shared_n = sum(p.numel() for p in layer.shared.parameters()) if layer.shared is not None else 0
        return routed + shared_n, routed * moe.num_active_routed // moe.num_routed_experts + shared_n

    assert counts(1) == counts(2) == counts(4)
    assert counts(1)[0] == 3 * D * 64 * (8 + shared)


def test_update_expert_bias_direction():
    bias = torch.zeros(4)
    update_expert_bias(bias, torch.tensor([10, 2, 4, 0]), 0.1)  # mean 4
    assert torch.allclose(bias, torch.tensor([-0.1, 0.1, 0.0, 0.1]))


def test_bias_accumulation_and_update():
    layer = _layer(scoring="sigmoid", bias_update_rate=0.5)
    assert "router.expert_bias_E" in layer.state_dict() and "expert_load_E" not in layer.state_dict()
    x = torch.randn(2, 5, D)
    layer.eval()
    layer(x)
    assert layer.expert_load_E.sum() == 0  # eval forwards do not count
    layer.train()
    layer(x)
    layer(x)
    load = layer.expert_load_E.clone()
    assert load.sum() == 2 * 10 * 2
    seen = []
    update_expert_biases(torch.nn.Sequential(layer), reduce=lambda t: seen.append(t.clone()) or t * 3)
    assert torch.equal(seen[0], load) and layer.expert_load_E.sum() == 0
    expected = 0.5 * torch.sign(load.double().mean() - load.double()).float()
    assert torch.allclose(layer.router.expert_bias_E, expected)


@torch.no_grad()
def test_bias_changes_selection_not_weights():
    layer = _layer(scoring="sigmoid", norm_topk_prob=True, bias_update_rate=1e-3)
    x = torch.randn(1, 6, D)
    before = layer.router(x.view(-1, D))
    layer.router.expert_bias_E[3] = 10.0
    after = layer.router(x.view(-1, D))
    assert (after.topk_ids_TK == 3).any(-1).all()
    assert not torch.equal(before.topk_ids_TK.sort(-1).values, after.topk_ids_TK.sort(-1).values)
    s = after.scores_TE.gather(1, after.topk_ids_TK)
    assert torch.allclose(after.topk_weights_TK, s / s.sum(-1, keepdim=True))
    assert torch.equal(before.scores_TE, after.scores_TE)


def test_swiglu():
    torch.manual_seed(0)
    mlp = SwiGLU(D, 12)
    x = torch.randn(3, D)
    ref = mlp.w_down.weight @ (torch.nn.functional.silu(mlp.w_gate.weight @ x.T) * (mlp.w_up.weight @ x.T))
    assert torch.allclose(mlp(x), ref.T, atol=1e-6)
    assert all(lin.bias is None for lin in (mlp.w_gate, mlp.w_up, mlp.w_down))


def test_bf16_forward_dtype():
    layer = _layer(num_shared_experts=1).to(torch.bfloat16)
    y, out = layer(torch.randn(2, 4, D, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and out.stats["tokens_per_expert_E"].sum() == 16


@torch.no_grad()
def test_device_load_and_comm_imbalance_from_hand_made_routing():
    # 8 experts on 2 devices: experts 0-3 on device 0, 4-7 on device 1.
    layer = _layer()
    ids_TK = torch.tensor([[0, 1], [2, 3], [0, 5], [1, 2]])
    route_fn = layer.router.forward
    layer.router.forward = lambda x_TD: route_fn(x_TD)._replace(topk_ids_TK=ids_TK)
    x = torch.randn(1, 4, D)
    _, one = layer(x)
    assert imbalance(one.stats["tokens_per_device_G"]) == 1.0
    assert imbalance(one.stats["tokens_received_per_device_G"]) == 1.0

    layer.num_devices = 2
    layer.count_reducer = lambda t: 2 * t  # stands in for a sum over two ranks that routed alike
    _, out = layer(x)
    # Copies processed: device 0 gets 2+2+1+2 = 7, device 1 gets 1; tokens received (deduplicated): 4 and 1.
    assert out.stats["tokens_per_device_G"].tolist() == [14.0, 2.0]
    assert out.stats["tokens_received_per_device_G"].tolist() == [8.0, 2.0]
    assert imbalance(out.stats["tokens_per_device_G"]) == pytest.approx(7 / 4)
    assert imbalance(out.stats["tokens_received_per_device_G"]) == pytest.approx(4 / 2.5)
    assert not {"load_min", "load_max", "load_cv", "device_load_imbalance"} & set(out.stats)  # ratios: metrics.py


@pytest.mark.parametrize("expert_factor", [None, 0.75])
@torch.no_grad()
def test_device_capacity_drops_pass_through_as_zero(expert_factor):
    layer = _layer(device_capacity_factor=0.6, capacity_factor=expert_factor)
    layer.num_devices = 2
    x = torch.randn(2, 8, D)
    y, out = layer(x)
    r = layer.router(x.view(-1, D))
    budget = device_capacity(r.topk_ids_TK, 8, 2, 0.6)
    kept = drop_over_device_capacity(r.topk_ids_TK, r.topk_weights_TK, 8, 2, budget)
    if expert_factor is not None:  # per-expert capacity applies to what the device budget kept
        kept = drop_over_capacity(kept, 8, expert_capacity(16, 2, 8, expert_factor))
    assert (kept < 0).any()
    assert torch.allclose(y, _naive(layer, x, kept), atol=1e-5)  # dropped slots contribute exactly zero
    assert out.stats["dropped_frac"].item() == pytest.approx((kept < 0).float().mean().item())
    assert out.stats["tokens_per_expert_E"].sum() == 32  # balance statistics see the router's selection
    fully_dropped = (kept < 0).all(-1)
    assert fully_dropped.any()  # the block adds zero: such a token passes through on the residual
    assert torch.equal(y.view(-1, D)[fully_dropped], torch.zeros(int(fully_dropped.sum()), D))


@torch.no_grad()
def test_device_capacity_one_device_drops_nothing():
    layer = _layer(device_capacity_factor=1.0)
    x = torch.randn(2, 5, D)
    y, out = layer(x)
    assert out.stats["dropped_frac"] == 0.0
    assert torch.allclose(y, _naive(layer, x), atol=1e-5)
