"""Pipeline parallelism's pieces in one process: the rank grid with a pipeline axis, which rank keeps which
parameters (logical names, the embedding's twin on the last stage), and chunks run one after another giving the
whole model's loss and gradients (the balance losses reach the router through `AuxLoss`, not the loss value).
The multi-rank runs are tests/integration/test_pipeline_train.py."""
import copy

import torch

from parallel.mesh import Mesh, edp_group_ranks, ep_group_ranks, pp_group_ranks
from parallel.pipeline import split_pipeline
from train.build import meta_model
from train.config import load_train_config
from train.model import build_model
from train.config.pipeline import stage_layout
from train.model.stage import EMBEDDING, ModelChunk, keep_share


def _cfg(*overrides):
    return load_train_config(["model=tiny_deepseek_v3", "model.vocab_size=96", "model.d_model=48",
                              "model.dense_hidden=64", "model.moe.expert_hidden=16", "trainer.global_batch_size=8",
                              "model.moe.seq_balance_coef=0.01", "model.moe.z_loss_coef=0.001", *overrides])


def test_rank_grid_puts_stages_outermost():
    # W=8, P=2, ep=2: stage 1 holds ranks 4-7, inside it the EP x EDP grid of a whole 4-rank world, offset by 4
    m = Mesh(rank=5, world_size=8, ep_size=2, ep_rank=1, pp_size=2, pp_rank=1)
    assert (m.dp_size, m.dp_rank, m.edp_size, m.edp_rank, m.stage_offset) == (4, 1, 2, 0, 4)
    assert m.ep_group_ranks() == [4, 5] and m.edp_group_ranks() == [5, 7] and m.pp_group_ranks() == [1, 5]
    assert [ep_group_ranks(g, 4, 2, 4) for g in range(2)] == [[4, 5], [6, 7]]
    assert [edp_group_ranks(j, 4, 2, 4) for j in range(2)] == [[4, 6], [5, 7]]
    assert [pp_group_ranks(j, 8, 2) for j in range(4)] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    whole = Mesh(rank=3, world_size=4, ep_size=2, ep_rank=1)  # no pipeline: the old grid, unchanged
    assert (whole.dp_size, whole.dp_rank, whole.edp_rank, whole.ep_group_ranks()) == (4, 3, 1, [2, 3])


def test_interleaved_split_keeps_logical_names_and_one_embedding_twin():
    cfg = _cfg("parallel.pp_size=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2")
    whole = {n: tuple(p.shape) for n, p in meta_model(cfg.model).named_parameters()}
    shares = []
    for rank in range(2):
        model = meta_model(cfg.model)
        split = split_pipeline(model, stage_layout(cfg), 2, rank)
        shares.append((model, split))
    (m0, s0), (m1, s1) = shares
    assert [(c, list(ch.layers.keys())) for c, ch in s0.chunks] == [(0, ["0"]), (2, ["2"])]
    assert [(c, list(ch.layers.keys())) for c, ch in s1.chunks] == [(1, ["1"]), (3, ["3"])]
    assert s0.chunks[0][1].first and s1.chunks[-1][1].last and not s0.chunks[1][1].first
    assert s0.copies == frozenset() and s1.copies == {EMBEDDING} and s0.shares_embedding and s1.shares_embedding
    names0 = {n: tuple(p.shape) for n, p in m0.named_parameters()}
    names1 = {n: tuple(p.shape) for n, p in m1.named_parameters()}
    assert names0.keys() & names1.keys() == {EMBEDDING}  # the MTP module's embedding twin
    assert {**names0, **names1} == whole  # every parameter somewhere, under its whole-model name and shape
    assert [i for i, _ in m1.moe_layers()] == [1, 3, 4]  # the MTP block (layer 4) with the last stage


def test_chunks_in_a_row_give_the_whole_models_loss_and_gradients():
    cfg = _cfg()
    torch.manual_seed(0)
    ref = build_model(cfg.model)
    share = keep_share(copy.deepcopy(ref), range(cfg.model.num_layers), embed=True, head=True)
    first, last = ModelChunk(share, [0, 1], first=True, last=False), ModelChunk(share, [2, 3], first=False, last=True)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (2, 13), generator=g)
    x, y = ids[:, :-1], ids[:, 1:]

    out = ref(x, y)
    out.loss.backward()
    loss = last(first(x, input_ids=x, labels=y), input_ids=x, labels=y)
    loss.backward()  # no aux term in the value: it flows in through the hidden states
    parts = first.outputs + last.outputs
    torch.testing.assert_close(loss + sum(p.aux_loss for p in parts), out.loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(last.outputs[0].lm_loss, out.lm_loss, rtol=0, atol=0)
    torch.testing.assert_close(last.outputs[0].mtp_loss, out.mtp_loss, rtol=0, atol=0)
    assert sorted(s["layer"] for p in parts for s in p.moe_stats) == [s["layer"] for s in out.moe_stats]
    assert any(t > 0 for p in parts for t in p.aux_terms.values())
    for (name, p), q in zip(ref.named_parameters(), share.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)
