"""Device-level token capacity under expert parallelism (2 gloo ranks, ep_size = 2).

Each rank applies the budget to the copies it sends (its share of every device's budget), so the reference is
per rank: the unsharded layer with `num_devices` = 2 run on that rank's own tokens. Checked: every rank sends
at most its budget to each device, every device receives at most the sum of the ranks' budgets, the budget
actually binds, and outputs and input gradients equal the reference.
"""
import copy

import pytest
import torch
from torch import nn

from tests.distributed._spawn import run_distributed

D, T_LOCAL, FACTOR = 16, 12, 0.75


class _OneLayer(nn.Module):
    """The smallest model `parallelize` accepts: one MoE layer."""

    def __init__(self, layer):
        super().__init__()
        self.ffn = layer

    def moe_layers(self):
        yield 0, self.ffn


def _check_device_capacity(rank, world_size):
    import parallel.dispatcher as dispatcher_mod
    from parallel import all_reduce_stats, init_distributed, parallelize
    from train.config import load_train_config
    from train.model.moe import MoELayer, device_capacity, drop_over_device_capacity

    cfg = load_train_config([f"parallel.ep_size={world_size}", "trainer.device=cpu", "model.moe.num_experts=8",
                             "model.moe.top_k=3", "model.moe.expert_hidden=8",
                             f"model.moe.device_capacity_factor={FACTOR}"])
    mesh = init_distributed(cfg)
    torch.manual_seed(0)
    layer = MoELayer(D, cfg.model.moe, init_std=0.3)
    ref = copy.deepcopy(layer)
    ref.num_devices = world_size
    parallelize(_OneLayer(layer), cfg, mesh)

    g = torch.Generator().manual_seed(1)
    x_all = torch.randn(world_size, T_LOCAL, D, generator=g)
    x = x_all[rank : rank + 1].clone()

    counts = {}
    exchange = dispatcher_mod.exchange_counts

    def recording_exchange(send_counts_R2, group):  # per rank: (token copies, expert rows)
        recv = exchange(send_counts_R2, group)
        counts.setdefault("send", send_counts_R2[:, 0].clone())
        counts.setdefault("recv", recv[:, 0].clone())
        return recv

    dispatcher_mod.exchange_counts = recording_exchange
    try:
        x_par = x.clone().requires_grad_()
        y, out = layer(x_par)
        y.square().sum().backward()
    finally:
        dispatcher_mod.exchange_counts = exchange

    x_ref = x.clone().requires_grad_()
    y_ref, out_ref = ref(x_ref)
    y_ref.square().sum().backward()
    assert torch.allclose(y, y_ref, atol=1e-5), (y - y_ref).abs().max()
    assert torch.allclose(x_par.grad, x_ref.grad, atol=1e-5)

    with torch.no_grad():
        r = ref.router(x.view(-1, D))
        budget = device_capacity(r.topk_ids_TK, 8, world_size, FACTOR)
        kept = drop_over_device_capacity(r.topk_ids_TK, r.topk_weights_TK, 8, world_size, budget)
    assert (counts["send"] <= budget).all(), (counts["send"], budget)
    budgets = all_reduce_stats(torch.tensor([budget]), mesh)  # sum of every rank's share
    assert (counts["recv"] <= budgets[0]).all(), (counts["recv"], budgets)
    num_dropped = all_reduce_stats(torch.tensor([int((kept < 0).sum())]), mesh)
    assert num_dropped[0] > 0  # the budget binds
    assert out.stats["dropped_frac"].item() == pytest.approx(num_dropped[0].item() / (world_size * T_LOCAL * 3))


def test_device_capacity_bounds_receive_load_and_matches_reference():
    run_distributed(_check_device_capacity, 2)
