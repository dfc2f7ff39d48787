"""Construction in shards and sharded checkpoints, on 4 gloo ranks with ep_size=4 (one spawn for all checks).

- The trainer's path (meta device, then `parallelize`) allocates on each rank its dense tensors and its E/ep
  experts only: measured twice, as the bytes of the tensors the rank holds (equal to the memory planner's
  `params_bytes` for the layout) and as the growth of the process's peak resident memory during construction,
  which must stay below what the whole expert stack would need.
- Those tensors equal, tensor for tensor, what one process gives the unsharded model from the same seed.
- A checkpoint saved by the 4 ranks holds each logical tensor once, each rank's file holds only experts that
  rank owns, the index names every expert of every layer, and the files read back (in parallel into a fresh
  model, and in one process without any process group) give the same logical weights.
"""
from __future__ import annotations

import resource

import torch

from tests.distributed._spawn import run_distributed

WORLD, EP = 4, 4
# tiny_deepseek_v3's architecture (MLA, a dense first layer, shared + 16 routed experts, MTP) with wide experts,
# so that the expert stacks dominate the bytes and a full allocation would show in resident memory.
OVERRIDES = ["model=tiny_deepseek_v3", "model.num_layers=2", "model.vocab_size=256", "model.moe.expert_hidden=1024",
             f"parallel.ep_size={EP}", "trainer.device=cpu"]


def make_cfg():
    from train.config import load_train_config

    return load_train_config(OVERRIDES)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def _check_construction_and_checkpoint(rank: int, world_size: int, tmp: str) -> None:
    from pathlib import Path

    from train.checkpoint import sharded
    from parallel import init_distributed, parallelize
    from parallel.memory import unique_bytes
    from train.model import MoETransformer, build_model
    from train.model.transformer import draw_init_seed
    from train.plan.planner import plan_memory

    cfg = make_cfg()
    mesh = init_distributed(cfg)
    with torch.device("meta"):
        logical = MoETransformer(cfg.model)
    expert_names = set(sharded.expert_slices(logical))
    expert_bytes = sum(p.numel() * 4 for n, p in logical.named_parameters() if n in expert_names)
    dense_bytes = sum(t.numel() * 4 for n, t in logical.state_dict().items() if n not in expert_names
                      and not (cfg.model.tie_embeddings and n == "lm_head.weight"))
    own_bytes = dense_bytes + expert_bytes // EP

    # --- construction: what the trainer does
    before = _rss_bytes()
    torch.manual_seed(123)
    init_seed = draw_init_seed()
    with torch.device("meta"):
        model = MoETransformer(cfg.model)
    parallelize(model, cfg, mesh, init_seed=init_seed)
    growth = _peak_rss_bytes() - before
    held = unique_bytes(model.state_dict().values())  # persistent tensors (no RoPE table, no load counter)
    assert held == own_bytes, (rank, held, own_bytes)
    planned = plan_memory(cfg, WORLD)["params_bytes"]  # what `python -m train.plan` says for this layout
    assert unique_bytes(model.parameters()) == planned, (rank, unique_bytes(model.parameters()), planned)
    # a full allocation would add all 16 experts (3/4 more than this rank's 4) to the peak
    assert growth < own_bytes + (expert_bytes - expert_bytes // EP) // 2, (rank, growth, own_bytes, expert_bytes)

    # --- the same values as one process building the whole model from the same seed
    torch.manual_seed(123)
    whole = build_model(cfg.model).state_dict()
    for name, t in model.state_dict().items():
        ref = whole[name]
        if name in expert_names:
            first = mesh.ep_rank * (ref.shape[0] // EP)
            ref = ref[first:first + t.shape[0]]
        assert torch.equal(t, ref), (rank, name)

    # --- a sharded save by the 4 ranks
    ckpt = Path(tmp) / "ckpt"
    exported = ((n, {"param": p.detach(), "exp_avg": torch.full_like(p, float(rank))})
                for n, p in model.named_parameters())
    sharded.save(sharded.collect_owned(model, exported, mesh), ckpt, mesh)
    md = sharded.SafeReader(ckpt / sharded.STATE_DIR).read_metadata()
    stored = [(idx.fqn, info.relative_path) for idx, info in md.storage_data.items()]
    assert len({fqn for fqn, _ in stored}) == len(stored)  # no logical tensor written twice
    logical_bytes = 2 * (dense_bytes + expert_bytes)  # weights + one state tensor each (buffers have no state)
    written = sum(info.length for info in md.storage_data.values())
    assert logical_bytes <= written < 1.1 * logical_bytes, (written, logical_bytes)  # views are not whole stacks
    per_expert = 16 // EP
    for fqn, path in stored:
        if "/expert/" in fqn:  # expert e lives on the ranks whose EP position is e // (E/ep): only they write it
            writer = int(path.split("_")[2])
            assert writer % EP == int(fqn.rsplit("/expert/", 1)[1].split("/")[0]) // per_expert, (fqn, path)
    if rank == 0:
        for name in expert_names:
            assert {f"model/{name}/expert/{e}" for e in range(16)} <= set(md.state_dict_metadata), name
        one_process = dict(sharded.iter_logical_weights(ckpt))  # no process group needed to read it
        for name, t in whole.items():
            if not (cfg.model.tie_embeddings and name == "lm_head.weight"):
                assert torch.equal(one_process[name], t), name

    # --- read back in parallel into a freshly initialised model (other seed): every tensor restored
    with torch.device("meta"):
        fresh = MoETransformer(cfg.model)
    parallelize(fresh, cfg, mesh, init_seed=7)
    sharded.load_model_weights(fresh, ckpt, mesh)
    for (name, t), ref in zip(fresh.state_dict().items(), model.state_dict().values()):
        assert torch.equal(t, ref), (rank, name)
    batches = list(sharded.read_optimizer_state(fresh, ckpt, mesh))
    states = {n: s for b in batches for n, s in b.items()}
    for name, p in fresh.named_parameters():
        assert states[name]["exp_avg"].shape == p.shape, name
        if name in expert_names:  # experts are written by their owners (the replica of that EP position)
            assert (states[name]["exp_avg"] % EP == mesh.ep_rank).all(), name


def test_construction_in_shards_and_a_sharded_save(tmp_path):
    run_distributed(_check_construction_and_checkpoint, WORLD, str(tmp_path))
