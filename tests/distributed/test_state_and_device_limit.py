"""Logical checkpoints of a sharded model, and device-limited routing under expert parallelism: it bounds the
devices and the traffic, and with the model's routing groups it computes the same function on any layout."""
import torch

from tests.distributed._spawn import run_distributed
from tests.distributed.test_expert_parallel import ATOL, B_LOCAL, RTOL, batch, build, make_cfg


def _check_state_dict(rank, world_size):
    from parallel import gather_full_state_dict, init_distributed, load_full_state_dict, parallelize
    from train.model.moe.placement import ExpertPlacement

    cfg = make_cfg(ep_size=2)
    mesh = init_distributed(cfg)
    ref_sd = build(cfg).state_dict()
    model = parallelize(build(cfg), cfg, mesh)
    full = gather_full_state_dict(model, mesh)
    if rank == 0:
        assert list(full) == list(ref_sd)  # same keys, same order as the unsharded model
        for k, v in ref_sd.items():
            assert torch.equal(full[k], v), k
    else:
        assert full == {}

    # load a different logical state: each rank keeps its slice, and gathering gives it back
    new_sd = {k: v + 1.0 if v.is_floating_point() else v for k, v in ref_sd.items()}
    load_full_state_dict(model, new_sd, mesh)
    for _, layer in model.moe_layers():
        e = layer.experts
        assert e.w_down_EDF.shape[0] == 8 and e.placement == ExpertPlacement(16, 2, rank % 2)
    key = "layers.1.ffn.experts.w_gate_up_EHD"
    lo = 8 * (rank % 2)
    assert torch.equal(model.state_dict()[key], new_sd[key][lo : lo + 8])
    again = gather_full_state_dict(model, mesh)
    if rank == 0:
        for k, v in new_sd.items():
            assert torch.equal(again[k], v), k


def test_gather_and_load_full_state_dict():
    run_distributed(_check_state_dict, 4)


def _sent_and_devices(cfg, mesh, x, y):
    from parallel import all_reduce_stats, parallelize

    model = parallelize(build(cfg), cfg, mesh)
    with torch.no_grad():
        out = model(x, y)  # labels, so the MTP block's MoE layer runs too
    max_devices = max(int(layer.dispatcher.stats["devices_per_token_max"]) for _, layer in model.moe_layers())
    max_devices = max(max_devices, max(int(s["devices_per_token_max"]) for s in out.moe_stats))
    sent = sum(layer.dispatcher.stats["a2a_tokens_sent"] for _, layer in model.moe_layers())
    naive = sum(layer.dispatcher.stats["a2a_tokens_sent_naive"] for _, layer in model.moe_layers())
    total = all_reduce_stats(torch.tensor([sent, naive]), mesh)
    return max_devices, int(total[0]), int(total[1])


def _check_device_limit(rank, world_size):
    from parallel import init_distributed

    x, y = batch(world_size, 0)
    x, y = x[rank * B_LOCAL : (rank + 1) * B_LOCAL], y[rank * B_LOCAL : (rank + 1) * B_LOCAL]
    mesh = init_distributed(make_cfg(4))
    unlimited = _sent_and_devices(make_cfg(4, device_limit=4), mesh, x, y)  # M = ep_size: no restriction
    assert unlimited[0] > 2
    previous = unlimited[1]
    for m in (2, 1):
        max_devices, sent, naive = _sent_and_devices(make_cfg(4, device_limit=m), mesh, x, y)
        assert max_devices <= m, (m, max_devices)
        assert sent < previous, (m, sent, previous)
        assert sent <= naive
        previous = sent
    _check_same_logits_on_every_layout(rank, world_size, x, y)


def _limited_cfg(ep_size: int):
    cfg = make_cfg(ep_size, device_limit=2)
    cfg.model.moe.routing_groups = 4  # what a run on 4 ranks resolves and stores
    return cfg


def _check_same_logits_on_every_layout(rank, world_size, x, y):
    """A model with device_limit=2 over routing_groups=4 gives the same logits in one process (the global batch)
    and on this rank's slice with ep 4 (one EP group of the 4 ranks) and ep 2 (two EP groups of 2 ranks): the
    layout changes where experts live, not which experts a token uses."""
    from parallel import parallelize
    from parallel.mesh import build_mesh

    x_all, y_all = batch(world_size, 0)
    mine = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    with torch.no_grad():
        ref = build(_limited_cfg(1))(x_all, y_all).logits[mine]
        unlimited = build(make_cfg(1))(x_all, y_all).logits[mine]
        assert (ref - unlimited).abs().max() > 1e-3  # the limit changes the function, so the test means something
        for ep in (4, 2):
            cfg = _limited_cfg(ep)
            mesh = build_mesh(rank, world_size, ep, torch.device("cpu"))
            out = parallelize(build(cfg), cfg, mesh)(x, y)
            torch.testing.assert_close(out.logits, ref, atol=ATOL, rtol=RTOL, msg=f"ep {ep}")
            if ep == 4:  # the routing groups are the devices: the limit bounds the devices per token
                assert max(s["devices_per_token_max"] for s in out.moe_stats) <= 2


def test_device_limit_bounds_devices_and_traffic_and_routing_groups_fix_the_function():
    run_distributed(_check_device_limit, 4)
