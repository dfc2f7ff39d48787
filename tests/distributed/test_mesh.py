"""Mesh layout (EP ranks adjacent) and configuration errors."""
import pytest
import torch

from tests.distributed._spawn import run_distributed


def _cfg(*overrides):
    from train.config import load_train_config

    return load_train_config(["model=tiny_deepseek_v3", "trainer.device=cpu", *overrides])


def test_single_process_mesh_is_trivial():
    from parallel import init_distributed

    mesh = init_distributed(_cfg())
    assert (mesh.rank, mesh.world_size, mesh.ep_size, mesh.ep_rank, mesh.dp_size) == (0, 1, 1, 0, 1)
    assert mesh.ep_group is None and mesh.edp_group is None and mesh.device == torch.device("cpu")


@pytest.mark.parametrize(
    "overrides,world,field",
    [
        (["parallel.ep_size=4"], 6, "parallel.ep_size"),  # world not divisible
        (["parallel.ep_size=3"], 3, "model.moe.num_routed_experts"),  # 16 experts over 3 ranks
        (["parallel.ep_size=2"], 1, "parallel.ep_size"),  # single process cannot be expert parallel
    ],
)
def test_invalid_layouts_name_the_field(overrides, world, field):
    from parallel.mesh import validate_parallel_config

    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        validate_parallel_config(_cfg(*overrides), world)


def test_granularity_counts_in_expert_divisibility():
    from parallel.mesh import validate_parallel_config

    # 16 experts, 1 shared, granularity 2 → 2·17 − 1 = 33 routed experts: not divisible by 2
    with pytest.raises(ValueError, match="granularity=2"):
        validate_parallel_config(_cfg("parallel.ep_size=2", "model.moe.granularity=2",
                                      "model.moe.num_shared_experts=1"), 2)


def _check_layout(rank, world_size):
    import torch.distributed as dist

    from parallel import init_distributed

    mesh = init_distributed(_cfg("parallel.ep_size=2"))
    assert (mesh.rank, mesh.world_size, mesh.ep_size, mesh.dp_size) == (rank, 4, 2, 4)
    assert mesh.ep_rank == rank % 2 and mesh.edp_rank == rank // 2 and mesh.edp_size == 2
    g = rank // 2
    assert dist.get_process_group_ranks(mesh.ep_group) == [2 * g, 2 * g + 1]  # EP ranks adjacent
    assert dist.get_process_group_ranks(mesh.edp_group) == [rank % 2, rank % 2 + 2]
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=mesh.ep_group)
    assert t.item() == 4 * g + 1


def test_ep_groups_are_adjacent_ranks():
    run_distributed(_check_layout, 4)
