"""`ExpertPlacement` with hand-worked numbers, and every module that places experts agreeing with it.

The agreement checks build, in one process, what EP rank 2 of a layout with E = 12 routed experts holds for
ep_size 3, 4 and 6 (world = 2·ep, this rank in the second EP group): the sharded model (`parallelize` on the meta
device, then materialised), and ask the dispatcher, the device map of the balance terms and device capacity, the
seeded init, the state-dict loader, the sharded checkpoint's keys and writers, the gradient split, the ZeRO glue's
group lists and the memory planner which experts live where.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from train.model.moe.placement import ExpertPlacement

E = 12


# ---------------------------------------------------------------------------------------------- hand-worked
def test_placement_twelve_experts_over_three_ranks_seen_from_rank_two():
    p = ExpertPlacement(12, 3, 2)
    assert p.num_local_experts == 4
    assert p.local_start == 8 and p.local_range == range(8, 12)
    assert [p.owner(e) for e in range(12)] == [0] * 4 + [1] * 4 + [2] * 4
    assert [e for e in range(12) if p.is_local(e)] == [8, 9, 10, 11]
    assert [p.to_local(e) for e in (0, 5, 9, 11)] == [0, 1, 1, 3]
    assert p.start_of(1) == 4 and p.on_rank(1).local_range == range(4, 8)
    ids = torch.tensor([[0, 5], [11, -1], [-1, -1]])
    assert p.owner_of(ids).tolist() == [[0, 1], [2, -1], [-1, -1]]
    assert p.owner_of(ids, dropped=3).tolist() == [[0, 1], [2, 3], [3, 3]]
    assert p.start_of(torch.tensor([0, 2])).tolist() == [0, 8]
    x_E = torch.arange(12.0)  # each rank's total over its own block, batched over leading dims too
    assert p.sum_per_rank(x_E).tolist() == [6.0, 22.0, 38.0]
    assert p.sum_per_rank(torch.stack([x_E, 2 * x_E])).tolist() == [[6.0, 22.0, 38.0], [12.0, 44.0, 76.0]]


def test_placement_whole_and_six_ranks():
    w = ExpertPlacement.whole(12)
    assert (w.ep_size, w.ep_rank, w.num_local_experts, w.local_range) == (1, 0, 12, range(12))
    assert w.is_whole and all(w.owner(e) == 0 and w.is_local(e) and w.to_local(e) == e for e in range(12))
    p = ExpertPlacement(12, 6, 2)  # two experts per rank
    assert p.local_range == range(4, 6) and [p.owner(e) for e in (0, 3, 4, 11)] == [0, 1, 2, 5]


def test_placement_refuses_impossible_layouts_with_the_fields_named():
    with pytest.raises(ValueError, match=r"model\.moe\.num_experts=12.*parallel\.ep_size=5"):
        ExpertPlacement(12, 5)
    with pytest.raises(ValueError, match="ep_rank=3"):
        ExpertPlacement(12, 3, 3)
    with pytest.raises(IndexError):
        ExpertPlacement(12, 3).owner(12)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ExpertPlacement(12, 3).ep_rank = 1


def test_grouped_experts_declares_whole_and_shards_once():
    from train.model.moe.experts import GroupedExperts

    experts = GroupedExperts(12, 8, 4)
    assert experts.placement == ExpertPlacement.whole(12) and experts.num_experts == 12
    full = experts.w_down_EDF.detach().clone()
    experts.shard(ExpertPlacement(12, 4, 2))
    assert experts.num_experts == 3 and experts.w_gate_up_EHD.shape == (3, 8, 8)
    assert torch.equal(experts.w_down_EDF, full[6:9])
    experts.shard(ExpertPlacement(12, 4, 2))  # the same placement again: nothing to do
    with pytest.raises(ValueError, match="cannot be resharded"):
        experts.shard(ExpertPlacement(12, 2, 1))


# ---------------------------------------------------------------------------------------------- agreement
def _cfg(ep: int):
    from train.config import load_train_config

    return load_train_config(["model=tiny_deepseek_v3", "model.num_layers=2", "model.vocab_size=96",
                              "model.d_model=32", "model.moe.expert_hidden=8", f"model.moe.num_experts={E}",
                              "model.moe.num_groups=1", "model.moe.topk_groups=1", f"parallel.ep_size={ep}",
                              "trainer.device=cpu"])


def _rank_model(ep: int):
    """(cfg, mesh of world rank ep + 2 = EP rank 2 of EDP group 1, its parallelized model, the whole model)."""
    from parallel import parallelize
    from parallel.mesh import Mesh
    from train.model import build_model

    cfg = _cfg(ep)
    mesh = Mesh(rank=ep + 2, world_size=2 * ep, ep_size=ep, ep_rank=2)
    with torch.device("meta"):
        model, whole = build_model(cfg.model), build_model(cfg.model)
    parallelize(model, cfg, mesh, init_seed=7)
    whole.to_empty(device="cpu")
    whole.init_weights(7)
    return cfg, mesh, model, whole


@pytest.mark.parametrize("ep", [3, 4, 6])
def test_every_module_agrees_on_the_placement(ep):
    from train.checkpoint import sharded
    from parallel.dispatcher import AllToAllDispatcher
    from parallel.grads import _split_params
    from parallel.parallelize import expert_parameters
    from parallel.permute import plan_send
    from parallel.state_dict import load_full_state_dict
    from train.model.moe import losses
    from train.model.moe.capacity import drop_over_device_capacity
    from train.model.moe.experts import GroupedExperts, stacked_expert_tensors
    from train.plan.planner import rank_params

    cfg, mesh, model, whole = _rank_model(ep)
    p = ExpertPlacement(E, ep, 2)
    assert mesh.expert_placement(E) == p
    mine = list(range(2 * 12 // ep, 3 * 12 // ep))
    assert list(p.local_range) == mine

    # the model: every stacked expert tensor placed once, sliced to its range, initialised as the whole model's
    layers = list(model.moe_layers())
    assert layers
    for _, layer in layers:
        assert layer.experts.placement == p and layer.experts.num_experts == len(mine)
        assert layer.num_devices == ep
        assert isinstance(layer.dispatcher, AllToAllDispatcher) and layer.dispatcher.placement == p
    whole_params = dict(whole.named_parameters())
    names = stacked_expert_tensors(model)
    assert names and all(isinstance(m, GroupedExperts) for m in names.values())
    for name, t in model.named_parameters():
        ref = whole_params[name]
        torch.testing.assert_close(t, ref[mine[0] : mine[-1] + 1] if name in names else ref, rtol=0, atol=0)

    # the dispatcher's send plan: expert e goes to rank owner(e) as local expert to_local(e)
    ids_E1 = torch.arange(E).unsqueeze(1)
    plan = plan_send(ids_E1, layers[0][1].dispatcher.placement)
    assert plan.copy_rank_C.tolist() == [p.owner(e) for e in range(E)]
    assert plan.local_ids_CK[:, 0].tolist() == [p.to_local(e) for e in range(E)]

    # the layer's device map (balance terms, statistics, device capacity) is the same blocks
    mask_EG = losses.token_device_mask(ids_E1, E, ep)
    assert mask_EG.nonzero()[:, 1].tolist() == [p.owner(e) for e in range(E)]
    one_per_device = drop_over_device_capacity(ids_E1, torch.ones(E, 1), E, ep, capacity=1)
    kept = [e for e in range(E) if one_per_device[e, 0] >= 0]
    assert kept == [p.start_of(r) for r in range(ep)]

    # which parameters are experts: parallelize, the gradient split and the planner agree
    experts = expert_parameters(model)
    assert [n for n, q in model.named_parameters() if any(q is x for x in experts)] == list(names)
    for q in model.parameters():
        q.grad = torch.zeros_like(q)
    dense, expert = _split_params(model)
    assert len(expert) == len(names) and all(a is b for a, b in zip(expert, experts))
    assert len(dense) + len(expert) == len(list(model.parameters()))
    assert rank_params(cfg, mesh.world_size).expert_numel == sum(q.numel() for q in experts)

    # the logical state dict loads this rank's range
    sd = {k: v + 1.0 if v.is_floating_point() else v for k, v in whole.state_dict().items()}
    load_full_state_dict(model, sd, mesh)
    for name in names:
        assert torch.equal(model.state_dict()[name], sd[name][mine[0] : mine[-1] + 1])

    # the sharded checkpoint: placements, writers and the keys this rank writes
    slices = sharded.expert_slices(model)
    assert set(slices) == set(names) and all(s == p for s in slices.values())
    writers = sharded.Writers([], mesh.world_size, ep)
    for e in range(E):
        w = writers.expert(e, p)
        assert w % ep == p.owner(e) and p.on_rank(w % ep).is_local(e)
    exported = ((n, {"param": q.data}) for n, q in model.named_parameters())
    owned = sharded.collect_owned(model, exported, mesh)
    written = sorted({int(k.rsplit("/", 1)[1]) for k in owned if "/expert/" in k})
    assert written == [e for e in mine if e % mesh.edp_size == mesh.edp_rank]

    # the groups the ZeRO glue hands to DeepSpeed are the mesh's
    assert mesh.ep_group_ranks() == list(range(ep, 2 * ep))
    assert mesh.edp_group_ranks() == [2, ep + 2]
