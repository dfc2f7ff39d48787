"""Router: scoring rules, group/device-limited selection, expert bias, parity with transformers' routers.

Shape legend: T tokens, D model dim, E routed experts, K active experts.
"""
import pytest
import torch
from transformers import DeepseekV2Config, DeepseekV3Config, MixtralConfig
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from train.config.model import MoEConfig
from train.model.moe import MoELayer, Router

D = 16


def _router(seed=0, **kw) -> Router:
    torch.manual_seed(seed)
    cfg = MoEConfig(**{"num_experts": 8, "top_k": 2, "expert_hidden": 16, **kw})
    r = Router(D, cfg)
    torch.nn.init.normal_(r.gate.weight, std=0.5)
    return r


def _naive_topk(row, k, allowed=None):
    """Indices of the k largest entries of a python list, restricted to `allowed`."""
    cand = [i for i in range(len(row)) if allowed is None or i in allowed]
    return sorted(sorted(cand, key=lambda i: -row[i])[:k])


def _sorted_pairs(ids_TK, w_TK):
    order = ids_TK.argsort(dim=-1)
    return ids_TK.gather(1, order), w_TK.gather(1, order)


@pytest.mark.parametrize("norm", [False, True])
def test_softmax_topk(norm):
    r = _router(scoring="softmax_topk", norm_topk_prob=norm, routed_scaling_factor=16.0)
    x = torch.randn(10, D)
    out = r(x)
    ids, w = _sorted_pairs(out.topk_ids_TK, out.topk_weights_TK)
    for t in range(10):
        p = torch.softmax(x[t].double() @ r.gate.weight.double().T, -1).tolist()
        sel = _naive_topk(p, 2)
        ref = [p[i] for i in sel]
        if norm:
            ref = [v / sum(ref) for v in ref]
        assert ids[t].tolist() == sel
        assert torch.allclose(w[t].double(), torch.tensor(ref).double() * 16.0, atol=1e-5)
    assert out.logits_TE.dtype == out.scores_TE.dtype == out.topk_weights_TK.dtype == torch.float32


def test_topk_softmax_is_softmax_over_chosen_logits():
    r = _router(scoring="topk_softmax")
    out = r(torch.randn(12, D))
    chosen_logits = out.logits_TE.gather(1, out.topk_ids_TK)
    assert torch.allclose(out.topk_weights_TK, chosen_logits.softmax(-1), atol=1e-6)
    assert torch.allclose(out.topk_weights_TK.sum(-1), torch.ones(12))
    assert (out.topk_ids_TK == out.logits_TE.topk(2).indices).all()


@pytest.mark.parametrize("norm", [False, True])
def test_sigmoid_bias_changes_selection_not_weights(norm):
    r = _router(scoring="sigmoid", norm_topk_prob=norm, routed_scaling_factor=2.5, bias_update_rate=1e-3)
    x = torch.randn(6, D)
    r.expert_bias_E[:] = torch.tensor([0.0, 0, 0, 0, 0, 0, 0, 5.0])  # expert 7 always wins a slot
    out = r(x)
    ids, w = _sorted_pairs(out.topk_ids_TK, out.topk_weights_TK)
    s = torch.sigmoid(x @ r.gate.weight.T)
    for t in range(6):
        biased = (s[t] + r.expert_bias_E).tolist()
        sel = _naive_topk(biased, 2)
        assert 7 in sel and ids[t].tolist() == sel
        ref = s[t, sel]  # unbiased scores: the bias never enters the gate weights
        if norm:
            ref = ref / (ref.sum() + 1e-20)
        assert torch.allclose(w[t], ref * 2.5, atol=1e-6)


@pytest.mark.parametrize("group_score", ["max", "top2_sum"])
def test_group_limited(group_score):
    r = _router(scoring="sigmoid", num_experts=16, top_k=4, num_groups=4, topk_groups=2, group_score=group_score)
    x = torch.randn(20, D)
    out = r(x)
    s = out.scores_TE
    for t in range(20):
        row = s[t].tolist()
        groups = [row[4 * g : 4 * g + 4] for g in range(4)]
        gs = [max(g) if group_score == "max" else sum(sorted(g)[-2:]) for g in groups]
        best = sorted(range(4), key=lambda g: -gs[g])[:2]
        allowed = {4 * g + j for g in best for j in range(4)}
        assert sorted(out.topk_ids_TK[t].tolist()) == _naive_topk(row, 4, allowed)


def test_device_limited_routing_respects_limit():
    torch.manual_seed(0)
    layer = MoELayer(D, MoEConfig(num_experts=16, top_k=6, expert_hidden=16, device_limit=2))
    torch.nn.init.normal_(layer.router.gate.weight, std=1.0)
    x = torch.randn(2, 32, D)
    _, out = layer(x)
    assert out.stats["devices_per_token_max"] == 1  # one device: trivially
    layer.num_devices = 4
    _, out = layer(x)
    devices_TK = layer.router(x.view(-1, D)).topk_ids_TK // 4
    assert max(len(set(row)) for row in devices_TK.tolist()) <= 2
    assert out.stats["devices_per_token_max"] <= 2
    # Without the limit the same tokens spread over more devices, so the limit did something.
    layer.router.device_limit = None
    _, free = layer(x)
    assert free.stats["devices_per_token_max"] > 2


def test_device_limit_takes_the_place_of_config_groups():
    # V3-style node groups (4 groups, keep 2) plus device_limit=1 over 2 devices: the device limit wins.
    moe = MoEConfig(num_experts=8, top_k=2, expert_hidden=16, num_groups=4, topk_groups=2, device_limit=1)
    r = Router(D, moe)
    assert r._selection_groups() == (4, 2, "max")  # one device: the config's groups apply
    r.num_devices = 2
    assert r._selection_groups() == (2, 1, "max")
    ids_TK = r(torch.randn(64, D)).topk_ids_TK
    assert ((ids_TK // 4).min(dim=1).values == (ids_TK // 4).max(dim=1).values).all()

def test_routing_groups_make_routing_independent_of_the_layout():
    # 16 experts in 4 routing groups of 4, top-6 within the best 2 groups: the same ids on 1, 2 and 4 devices.
    torch.manual_seed(0)
    layer = MoELayer(D, MoEConfig(num_experts=16, top_k=6, expert_hidden=16, device_limit=2, routing_groups=4))
    torch.nn.init.normal_(layer.router.gate.weight, std=1.0)
    x_TD = torch.randn(64, D)
    ids = {}
    for G in (1, 2, 4):
        layer.num_devices = G
        ids[G] = layer.router(x_TD).topk_ids_TK.sort(dim=-1).values
    assert torch.equal(ids[1], ids[2]) and torch.equal(ids[1], ids[4])
    scores_TE = layer.router(x_TD).scores_TE
    for t in range(64):  # by hand: the 2 groups with the best single expert, then the top 6 inside them
        row = scores_TE[t].tolist()
        best = sorted(range(4), key=lambda g: -max(row[4 * g: 4 * g + 4]))[:2]
        allowed = {4 * g + j for g in best for j in range(4)}
        assert ids[1][t].tolist() == _naive_topk(row, 6, allowed)
    free = Router(D, MoEConfig(num_experts=16, top_k=6, expert_hidden=16))
    free.gate.weight.data.copy_(layer.router.gate.weight)
    assert not torch.equal(free(x_TD).topk_ids_TK.sort(dim=-1).values, ids[1])  # the limit did something


def test_routing_groups_need_not_be_the_devices():
    # 4 routing groups of 4 experts, 2 allowed, on 8 devices of 2 experts: a group spans 2 devices, so a token
    # reaches at most 4 devices, which the layer's device statistics (over the 8 real devices) show.
    torch.manual_seed(1)
    layer = MoELayer(D, MoEConfig(num_experts=16, top_k=6, expert_hidden=16, device_limit=2, routing_groups=4))
    torch.nn.init.normal_(layer.router.gate.weight, std=1.0)
    layer.num_devices = 8
    _, out = layer(torch.randn(2, 32, D))
    assert out.stats["tokens_per_device_G"].shape == (8,)
    assert 2 < out.stats["devices_per_token_max"] <= 4


@pytest.mark.parametrize("groups,limit,match", [
    (3, 1, r"model.moe.routing_groups=3 must divide the 16 routed experts"),
    (4, 5, r"model.moe.device_limit=5 must be between 1 and model.moe.routing_groups=4"),
    (8, 2, r"model.moe.device_limit=2 groups of 2 experts cannot hold top_k=6"),
])
def test_bad_routing_groups_name_the_fields(groups, limit, match):
    with pytest.raises(ValueError, match=match):
        Router(D, MoEConfig(num_experts=16, top_k=6, expert_hidden=16, device_limit=limit, routing_groups=groups))


def _copy_hf_experts(layer: MoELayer, hf_experts, F_: int) -> None:
    # HF: gate, up = linear(x, gate_up_proj[e]).chunk(2); y = linear(h, down_proj[e]).
    layer.experts.w_gate_up_EHD.data.copy_(hf_experts.gate_up_proj)  # the same layout as ours
    layer.experts.w_down_EDF.data.copy_(hf_experts.down_proj)


def _copy_hf_shared(layer: MoELayer, hf_mlp) -> None:
    layer.shared.w_gate.weight.data.copy_(hf_mlp.gate_proj.weight)
    layer.shared.w_up.weight.data.copy_(hf_mlp.up_proj.weight)
    layer.shared.w_down.weight.data.copy_(hf_mlp.down_proj.weight)


def _randomize(module):
    torch.manual_seed(1)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.3)


@torch.no_grad()
def test_parity_deepseek_v3():
    hf_cfg = DeepseekV3Config(
        hidden_size=D, num_attention_heads=4, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
        topk_group=2, moe_intermediate_size=8, n_shared_experts=1, norm_topk_prob=True, routed_scaling_factor=2.5,
    )
    hf = DeepseekV3MoE(hf_cfg).eval()
    _randomize(hf)
    hf.gate.e_score_correction_bias.copy_(torch.randn(16) * 0.1)
    moe = MoEConfig(
        num_experts=16, top_k=4, expert_hidden=8, num_shared_experts=1, granularity=1, scoring="sigmoid",
        norm_topk_prob=True, routed_scaling_factor=2.5, num_groups=4, topk_groups=2, group_score="top2_sum",
        bias_update_rate=1e-3,
    )
    # num_shared_experts=1 at m=1 keeps E=16, K=4 (derived values), shared width 8.
    ours = MoELayer(D, moe).eval()
    ours.router.gate.weight.copy_(hf.gate.weight)
    ours.router.expert_bias_E.copy_(hf.gate.e_score_correction_bias)
    _copy_hf_experts(ours, hf.experts, 8)
    _copy_hf_shared(ours, hf.shared_experts)
    x = torch.randn(2, 16, D)
    _, hf_w, hf_ids = hf.gate(x)
    out = ours.router(x.view(-1, D))
    a, b = _sorted_pairs(hf_ids, hf_w), _sorted_pairs(out.topk_ids_TK, out.topk_weights_TK)
    assert torch.equal(a[0], b[0]) and torch.allclose(a[1], b[1], atol=1e-6)
    assert torch.allclose(hf(x), ours(x)[0], atol=1e-5)


@torch.no_grad()
def test_parity_deepseek_v2_group_limited_greedy():
    hf_cfg = DeepseekV2Config(
        hidden_size=D, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16, num_experts_per_tok=4,
        n_group=4, topk_group=2, moe_intermediate_size=8, n_shared_experts=2, topk_method="group_limited_greedy",
        routed_scaling_factor=16.0,
    )
    hf = DeepseekV2Moe(hf_cfg).eval()
    _randomize(hf)
    moe = MoEConfig(
        num_experts=16, top_k=4, expert_hidden=8, num_shared_experts=2, scoring="softmax_topk",
        routed_scaling_factor=16.0, num_groups=4, topk_groups=2, group_score="max",
    )
    ours = MoELayer(D, moe).eval()
    ours.router.gate.weight.copy_(hf.gate.weight)
    _copy_hf_experts(ours, hf.experts, 8)
    _copy_hf_shared(ours, hf.shared_experts)
    x = torch.randn(2, 16, D)
    _, hf_w, hf_ids = hf.gate(x)
    out = ours.router(x.view(-1, D))
    a, b = _sorted_pairs(hf_ids, hf_w), _sorted_pairs(out.topk_ids_TK, out.topk_weights_TK)
    assert torch.equal(a[0], b[0]) and torch.allclose(a[1], b[1], atol=1e-5)
    assert torch.allclose(hf(x), ours(x)[0], atol=1e-4)


@torch.no_grad()
def test_parity_mixtral():
    hf_cfg = MixtralConfig(hidden_size=D, num_attention_heads=4, num_local_experts=8, num_experts_per_tok=2,
                           intermediate_size=8)
    hf = MixtralSparseMoeBlock(hf_cfg).eval()
    _randomize(hf)
    ours = MoELayer(D, MoEConfig(num_experts=8, top_k=2, expert_hidden=8, scoring="topk_softmax")).eval()
    ours.router.gate.weight.copy_(hf.gate.weight)
    _copy_hf_experts(ours, hf.experts, 8)
    x = torch.randn(2, 16, D)
    _, hf_w, hf_ids = hf.gate(x)
    out = ours.router(x.view(-1, D))
    assert torch.equal(hf_ids, out.topk_ids_TK)  # both sorted descending
    assert torch.allclose(hf_w, out.topk_weights_TK, atol=1e-6)
    assert torch.allclose(hf(x), ours(x)[0], atol=1e-5)
