"""Balance terms against direct transcriptions of the DeepSeek-V2/V3 and ST-MoE formulas (python loops).

Shape legend: B sequences, T tokens, E routed experts, K active experts, G devices.
"""
import math

import pytest
import torch

from train.config.model import MoEConfig
from train.model.moe import MoELayer, losses

# Hand-made: 4 tokens, 4 experts, top-2; devices {0,1} and {2,3}.
PROBS = [
    [0.4, 0.3, 0.2, 0.1],
    [0.1, 0.2, 0.3, 0.4],
    [0.5, 0.1, 0.3, 0.1],
    [0.25, 0.25, 0.25, 0.25],
]
IDS = [[0, 1], [3, 2], [0, 2], [1, 3]]
E, K, T, G = 4, 2, 4, 2
DEV = [[0, 1], [2, 3]]


def naive_f():
    return [E / (K * T) * sum(1 for t in range(T) if i in IDS[t]) for i in range(E)]


def naive_p():
    return [sum(PROBS[t][i] for t in range(T)) / T for i in range(E)]


def test_expert_balance():
    f, p = naive_f(), naive_p()
    ref = sum(f[i] * p[i] for i in range(E))
    counts = losses.expert_counts(torch.tensor(IDS), E)
    got = losses.expert_balance_loss(counts, torch.tensor(PROBS), T, K)
    assert counts.tolist() == [2, 2, 2, 2]
    assert math.isclose(got.item(), ref, rel_tol=1e-6)


def test_device_balance():
    f, p = naive_f(), naive_p()
    ref = sum((sum(f[j] for j in DEV[d]) / len(DEV[d])) * sum(p[j] for j in DEV[d]) for d in range(G))
    got = losses.device_balance_loss(losses.expert_counts(torch.tensor(IDS), E), torch.tensor(PROBS), T, K, G)
    assert math.isclose(got.item(), ref, rel_tol=1e-6)


@pytest.mark.parametrize("M", [1, 2])
def test_comm_balance(M):
    p = naive_p()
    sent = [sum(1 for t in range(T) if any(i in DEV[d] for i in IDS[t])) for d in range(G)]
    assert sent == [3, 3]  # token 1 uses only device 1; token 2 and 3 both; token 0 only device 0
    ref = sum(G / (M * T) * sent[d] * sum(p[j] for j in DEV[d]) for d in range(G))
    mask = losses.token_device_mask(torch.tensor(IDS), E, G)
    assert mask.sum(0).tolist() == sent
    got = losses.comm_balance_loss(mask.sum(0).float(), torch.tensor(PROBS), T, M)
    assert math.isclose(got.item(), ref, rel_tol=1e-6)


@pytest.mark.parametrize("E_,G_,groups,M,reach", [
    (16, 4, None, None, 4),  # not device-limited: every device
    (16, 4, 4, 2, 2),  # routing groups = devices (a new run's default): the device limit itself
    (16, 2, 4, 3, 2),  # two groups per device: never more than the 2 devices there are
    (16, 8, 4, 2, 4),  # a group spans 2 devices: 2 groups reach 4
    (12, 3, 4, 1, 2),  # groups of 3 over devices of 4: group 1 (experts 3-5) straddles devices 0 and 1
])
def test_max_devices_per_token(E_, G_, groups, M, reach):
    assert losses.max_devices_per_token(E_, G_, groups, M) == reach


def test_comm_balance_counts_the_layouts_devices_with_routing_groups():
    # 16 experts, routing groups of 4 (2 allowed) on 8 devices: the term is V2's over the 8 real devices with
    # M = the 4 devices a token can reach.
    layer = _layer(num_experts=16, top_k=4, comm_balance_coef=1.0, device_limit=2, routing_groups=4)
    layer.num_devices = 8
    x = torch.randn(2, 6, 16)
    _, out = layer(x)
    r = layer.router(x.view(-1, 16))
    sent = losses.token_device_mask(r.topk_ids_TK, 16, 8).sum(0).float()
    assert torch.allclose(out.aux_terms["comm_balance"], losses.comm_balance_loss(sent, r.scores_TE, 12, 4))


def test_seq_balance():
    B, S = 2, 2  # sequences = tokens {0,1} and {2,3}
    total = 0.0
    for b in range(B):
        toks = range(b * S, (b + 1) * S)
        f = [E / (K * S) * sum(1 for t in toks if i in IDS[t]) for i in range(E)]
        p = [sum(PROBS[t][i] for t in toks) / S for i in range(E)]
        total += sum(f[i] * p[i] for i in range(E))
    got = losses.seq_balance_loss(torch.tensor(IDS).view(B, S, K), torch.tensor(PROBS).view(B, S, E), K)
    assert math.isclose(got.item(), total / B, rel_tol=1e-6)


def test_z_loss():
    logits = [[1.0, -2.0, 0.5], [3.0, 3.0, -1.0]]
    ref = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits) / len(logits)
    assert math.isclose(losses.z_loss(torch.tensor(logits)).item(), ref, rel_tol=1e-6)


def test_sigmoid_probs_normalised():
    s = torch.tensor([[0.9, 0.1, 0.5, 0.5]])
    assert torch.allclose(losses.balance_probs(s, "sigmoid"), s / 2.0)
    assert losses.balance_probs(s, "softmax_topk") is s


def test_dropped_assignments_ignored_in_counts():
    ids = torch.tensor([[0, -1], [1, 0]])
    assert losses.expert_counts(ids, 3).tolist() == [2, 1, 0]
    assert losses.token_device_mask(ids, 4, 2).tolist() == [[True, False], [True, False]]


def _layer(**kw):
    torch.manual_seed(0)
    cfg = MoEConfig(**{"num_experts": 8, "top_k": 2, "expert_hidden": 8, **kw})
    layer = MoELayer(16, cfg)
    torch.nn.init.normal_(layer.router.gate.weight, std=0.5)
    return layer


def test_layer_terms_match_functions_and_coefs():
    coefs = dict(expert_balance_coef=0.1, device_balance_coef=0.2, comm_balance_coef=0.3, seq_balance_coef=0.4,
                 z_loss_coef=0.5)
    layer = _layer(**coefs)
    layer.num_devices = 2
    x = torch.randn(2, 5, 16)
    _, out = layer(x)
    r = layer.router(x.view(-1, 16))
    counts = losses.expert_counts(r.topk_ids_TK, 8)
    sent = losses.token_device_mask(r.topk_ids_TK, 8, 2).sum(0).float()
    ref = {
        "expert_balance": 0.1 * losses.expert_balance_loss(counts, r.scores_TE, 10, 2),
        "device_balance": 0.2 * losses.device_balance_loss(counts, r.scores_TE, 10, 2, 2),
        "comm_balance": 0.3 * losses.comm_balance_loss(sent, r.scores_TE, 10, 2),
        "seq_balance": 0.4 * losses.seq_balance_loss(r.topk_ids_TK.view(2, 5, 2), r.scores_TE.view(2, 5, 8), 2),
        "z_loss": 0.5 * losses.z_loss(r.logits_TE),
    }
    for name, v in ref.items():
        assert torch.allclose(out.aux_terms[name], v), name
    out.aux_terms["expert_balance"].backward()  # P is differentiable
    assert layer.router.gate.weight.grad.abs().sum() > 0


def test_zero_coef_terms_are_skipped(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("computed a term whose coefficient is 0")

    for fn in ("expert_balance_loss", "device_balance_loss", "comm_balance_loss", "seq_balance_loss", "z_loss"):
        monkeypatch.setattr(losses, fn, boom)
    _, out = _layer()(torch.randn(2, 5, 16))
    assert set(out.aux_terms) == {"expert_balance", "device_balance", "comm_balance", "seq_balance", "z_loss"}
    assert all(v.item() == 0.0 for v in out.aux_terms.values())


def test_count_reducer_covers_counts_and_token_count():
    # Two identical ranks: summing counts and tokens leaves f (and so every term) unchanged.
    coefs = dict(expert_balance_coef=1.0, device_balance_coef=1.0, comm_balance_coef=1.0)
    layer = _layer(**coefs)
    x = torch.randn(2, 5, 16)
    _, ref = layer(x)
    calls = []
    layer.count_reducer = lambda t: (calls.append(t.clone()), t * 2)[1]
    _, got = layer(x)
    assert len(calls) == 1  # one packed reduction per forward
    for name in coefs:
        key = name.removesuffix("_coef")
        assert torch.allclose(ref.aux_terms[key], got.aux_terms[key])
    assert torch.equal(got.stats["tokens_per_expert_E"], 2 * ref.stats["tokens_per_expert_E"])


def test_expert_balance_is_transformers_mixtral_loss_over_top_k():
    # Why mixtral configs state expert_balance_coef = top_k x router_aux_loss_coef (train/hf/mixtral.py).
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from train.model.moe.losses import expert_balance_loss

    torch.manual_seed(0)
    T, E, K = 64, 8, 2
    logits_TE = torch.randn(T, E)
    probs_TE = logits_TE.softmax(dim=-1)
    topk_ids_TK = probs_TE.topk(K, dim=-1).indices
    counts_E = torch.bincount(topk_ids_TK.flatten(), minlength=E).float()
    ours = expert_balance_loss(counts_E, probs_TE, num_tokens=T, top_k=K)
    theirs = load_balancing_loss_func((logits_TE,), num_experts=E, top_k=K)
    torch.testing.assert_close(theirs, K * ours)
