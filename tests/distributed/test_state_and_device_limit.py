"""Logical checkpoints of a sharded model, and device-limited routing under expert parallelism."""
import torch

from tests.distributed._spawn import run_distributed
from tests.distributed.test_expert_parallel import B_LOCAL, batch, build, make_cfg


def _check_state_dict(rank, world_size):
    from parallel import gather_full_state_dict, init_distributed, load_full_state_dict, parallelize

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
        assert e.w_down_EFD.shape[0] == 8 and e.expert_offset == 8 * (rank % 2)
    key = "layers.1.ffn.experts.w_gate_EDF"
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


def test_device_limit_bounds_devices_and_traffic():
    run_distributed(_check_device_limit, 4)
