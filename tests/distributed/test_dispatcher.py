"""AllToAllDispatcher against the single-process LocalDispatcher on the same global batch: outputs and the
gradients of tokens, gate weights and expert weights. Works on a bare `GroupedExperts` (no model)."""
import pytest
import torch

from tests.distributed._spawn import run_distributed

D, F, E, K, T_LOCAL = 8, 12, 8, 3, 6


def _global_problem(world_size: int, drop: bool):
    g = torch.Generator().manual_seed(0)
    T = T_LOCAL * world_size
    x = torch.randn(T, D, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    if drop == "empty":  # rank 0's experts get no token (it receives nothing); the last rank sends nothing
        e_loc = E // world_size
        ids = torch.stack([e_loc + torch.randperm(E - e_loc, generator=g)[:K] for _ in range(T)])
        ids[T - T_LOCAL :] = -1
    elif drop:
        ids[torch.rand(T, K, generator=g) < 0.25] = -1
        ids[0] = -1  # a token with every slot dropped
    w = torch.rand(T, K, generator=g)
    dy = torch.randn(T, D, generator=g)  # upstream gradient: loss = Σ y · dy
    return x, ids, w, dy


def _experts():
    from train.model.moe.experts import GroupedExperts

    torch.manual_seed(1)
    return GroupedExperts(E, D, F)


def _run(experts, dispatcher, x, ids, w, dy):
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    x_ND, counts = dispatcher.dispatch(x, ids, w)
    y = dispatcher.combine(experts(x_ND, counts))
    (y * dy).sum().backward()
    return y.detach(), x.grad, w.grad


def _cfg(world_size):
    from train.config import load_train_config

    return load_train_config([f"parallel.ep_size={world_size}", f"model.moe.num_experts={E}", "trainer.device=cpu"])


def _check_dispatcher(rank, world_size):
    for drop in (False, True, "empty"):
        _check_one(rank, world_size, drop)
    _check_one(rank, world_size, True, fp8=True)


def _check_one(rank, world_size, drop, fp8=False):
    """With `fp8` the rows cross as e4m3 with tile scales: the reference is the local dispatcher on the rows as
    quantized and dequantized (a row's quantization does not depend on where it goes), and the gradient of x is
    straight-through, so both still match to fp32 rounding."""
    from parallel import init_distributed
    from parallel.dispatcher import AllToAllDispatcher
    from train.model.moe.dispatch import LocalDispatcher
    from train.model.moe.placement import ExpertPlacement

    mesh = init_distributed(_cfg(world_size))
    assert (mesh.rank, mesh.ep_rank, mesh.ep_size) == (rank, rank, world_size)
    x, ids, w, dy = _global_problem(world_size, drop)

    ref = _experts()
    if fp8:
        from parallel.comm import dequantize_rows_fp8, quantize_rows_fp8

        x_wire = dequantize_rows_fp8(*quantize_rows_fp8(x), x.dtype)
        assert 0 < (x_wire - x).abs().max() <= x.abs().max() / 8  # e4m3 has 3 mantissa bits: it did round
        y_ref, gx_ref, gw_ref = _run(ref, LocalDispatcher(E), x_wire, ids, w, dy)
    else:
        y_ref, gx_ref, gw_ref = _run(ref, LocalDispatcher(E), x, ids, w, dy)

    placement = ExpertPlacement(E, world_size, rank)
    e_loc = placement.num_local_experts
    sl = slice(placement.local_start, placement.local_start + e_loc)
    loc = _experts()
    loc.shard(placement)
    disp = AllToAllDispatcher(mesh.ep_group, placement, fp8=fp8)
    ts = slice(rank * T_LOCAL, (rank + 1) * T_LOCAL)
    y, gx, gw = _run(loc, disp, x[ts], ids[ts], w[ts], dy[ts])

    torch.testing.assert_close(y, y_ref[ts], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gx, gx_ref[ts], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gw, gw_ref[ts], atol=1e-6, rtol=1e-5)
    # a local expert's gradient already sums the contributions of every rank's tokens (loss is a plain sum)
    for n in ("w_gate_up_EHD", "w_down_EDF"):
        torch.testing.assert_close(getattr(loc, n).grad, getattr(ref, n).grad[sl], atol=1e-6, rtol=1e-5)

    # dedup bookkeeping: copies sent away = distinct foreign owners per token
    owners = torch.where(ids[ts] >= 0, ids[ts] // e_loc, -1)
    expected = sum(len(set(o.tolist()) - {-1, rank}) for o in owners)
    assert disp.stats["a2a_tokens_sent"] == expected
    assert disp.stats["a2a_tokens_sent"] <= disp.stats["a2a_tokens_sent_naive"]
    assert disp.stats["devices_per_token_max"] <= min(K, world_size)


@pytest.mark.parametrize("world_size", [2, 4])
def test_all_to_all_dispatcher_matches_local(world_size):
    """Routing cases: every slot kept; random drops incl. a fully dropped token; a rank that receives nothing
    and a rank that sends nothing; FP8 rows on the wire."""
    run_distributed(_check_dispatcher, world_size)
