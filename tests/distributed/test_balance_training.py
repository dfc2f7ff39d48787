"""Training a deliberately unbalanced router with ONLY the device-level (then ONLY the communication) balance
loss makes the device (communication) load more even. One process with `num_devices` set, as `parallelize`
would set it: the terms only need the expert→device map, not real ranks."""
import pytest
import torch

E, K, G, D, T = 8, 2, 4, 16, 256


def _layer(term):
    from train.config.model import MoEConfig
    from train.model.moe.layer import MoELayer

    moe = MoEConfig(num_experts=E, top_k=K, expert_hidden=16, **{f"{term}_coef": 1.0})
    torch.manual_seed(0)
    layer = MoELayer(D, moe)
    layer.num_devices = G
    with torch.no_grad():  # every token prefers device 0's experts (0 and 1): x has a positive mean
        layer.router.gate.weight[:2] += 0.6
    return layer


def _imbalance(layer, x_TD):
    """(max/mean tokens per device, max/mean tokens sent per device) for the current routing."""
    from train.model.moe.losses import expert_counts, token_device_mask

    with torch.no_grad():
        ids_TK = layer.router(x_TD).topk_ids_TK
    load_G = expert_counts(ids_TK, E).view(G, -1).sum(-1)
    sent_G = token_device_mask(ids_TK, E, G).sum(0).float()
    return (load_G.max() / load_G.mean()).item(), (sent_G.max() / sent_G.mean()).item()


@pytest.mark.parametrize("term,which", [("device_balance", 0), ("comm_balance", 1)])
def test_balance_term_reduces_its_imbalance(term, which):
    layer = _layer(term)
    x_BTD = torch.randn(4, T // 4, D, generator=torch.Generator().manual_seed(1)) + 1.0
    x_TD = x_BTD.reshape(-1, D)
    before = _imbalance(layer, x_TD)[which]
    assert before > 3.0  # nearly everything lands on device 0
    opt = torch.optim.Adam(layer.router.parameters(), lr=0.02)
    for _ in range(60):
        _, out = layer(x_BTD)
        loss = out.aux_terms[term]
        assert all(v.item() == 0.0 for k, v in out.aux_terms.items() if k != term)  # only this term is on
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _imbalance(layer, x_TD)[which]
    print(f"{term}: imbalance {before:.2f} -> {after:.2f}")
    assert after < 0.5 * before, (term, before, after)
