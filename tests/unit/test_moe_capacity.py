"""Device-level token capacity (DeepSeek-V2 token dropping) against hand-worked cases and a naive loop.

Shape legend: T tokens, K active experts, E experts, G devices (contiguous blocks of E/G experts).
"""
import math

import pytest
import torch

from train.model.moe import device_capacity, drop_over_device_capacity

# 4 experts on 2 devices: experts 0-1 on device 0, 2-3 on device 1. Token 5's second slot is already dropped.
IDS_TK = torch.tensor([[0, 1], [0, 2], [1, 3], [2, 3], [0, 3], [3, -1]])
W_TK = torch.tensor([[0.5, 0.3], [0.6, 0.1], [0.2, 0.4], [0.3, 0.3], [0.3, 0.25], [0.5, 0.9]])


def _naive_drop(ids_TK, w_TK, E, G, capacity):
    """One device at a time: list its copies (token, summed weight), keep the `capacity` best."""
    out = ids_TK.clone()
    per_device = E // G
    for g in range(G):
        copies = []
        for t in range(ids_TK.shape[0]):
            slots = [k for k in range(ids_TK.shape[1]) if ids_TK[t, k] >= 0 and ids_TK[t, k] // per_device == g]
            if slots:
                copies.append((-sum(float(w_TK[t, k]) for k in slots), t, slots))
        for _, t, slots in sorted(copies)[capacity:]:  # sorted by affinity descending, then token order
            out[t, slots] = -1
    return out


def test_budget_counts_deduplicated_copies():
    # Device 0 copies: tokens 0, 1, 2, 4; device 1: tokens 1, 2, 3, 4, 5 -> 9 copies (token 3 counts once).
    assert device_capacity(IDS_TK, 4, 2, 0.4) == math.ceil(0.4 * 9 / 2) == 2
    assert device_capacity(IDS_TK, 4, 2, 1.0) == 5
    assert device_capacity(IDS_TK, 4, 1, 1.0) == 6  # one device: one copy per token
    assert device_capacity(torch.full((3, 2), -1), 4, 2, 1.0) == 0


def test_lowest_affinity_copies_are_dropped():
    # Budget 2. Device 0 affinities (sum): t0 .8, t1 .6, t4 .3, t2 .2 -> keeps t0, t1.
    # Device 1: t3 .6 (.3 + .3), t5 .5, t2 .4, t4 .25, t1 .1 -> keeps t3, t5 (the max rule would keep t5, t2).
    kept = drop_over_device_capacity(IDS_TK, W_TK, 4, 2, capacity=2)
    expected = torch.tensor([[0, 1], [0, -1], [-1, -1], [2, 3], [-1, -1], [3, -1]])
    assert torch.equal(kept, expected)
    assert torch.equal(kept, _naive_drop(IDS_TK, W_TK, 4, 2, 2))


def test_ties_keep_earlier_tokens():
    ids_TK = torch.tensor([[0], [1], [0], [1]])
    kept = drop_over_device_capacity(ids_TK, torch.ones(4, 1), 2, 1, capacity=3)
    assert kept.view(-1).tolist() == [0, 1, 0, -1]


@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("factor", [0.3, 0.8, 1.2])
def test_matches_naive_loop(G, factor):
    g = torch.Generator().manual_seed(G * 10 + int(factor * 10))
    T, K, E = 13, 3, 8
    ids_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    ids_TK[torch.rand(T, K, generator=g) < 0.2] = -1
    w_TK = torch.rand(T, K, generator=g)
    capacity = device_capacity(ids_TK, E, G, factor)
    kept = drop_over_device_capacity(ids_TK, w_TK, E, G, capacity)
    assert torch.equal(kept, _naive_drop(ids_TK, w_TK, E, G, capacity))
    copies_TG = torch.zeros(T, G, dtype=torch.bool)
    for t, k in (kept >= 0).nonzero().tolist():
        copies_TG[t, kept[t, k] // (E // G)] = True
    assert (copies_TG.sum(0) <= capacity).all()


def test_one_device_with_factor_at_least_one_drops_nothing():
    g = torch.Generator().manual_seed(0)
    ids_TK = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(10)])
    for factor in (1.0, 1.5):
        kept = drop_over_device_capacity(ids_TK, torch.rand(10, 2, generator=g), 8, 1,
                                         device_capacity(ids_TK, 8, 1, factor))
        assert torch.equal(kept, ids_TK)
