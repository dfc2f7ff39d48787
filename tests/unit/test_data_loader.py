"""Packed blocks and the world-size-independent batch order (map-style and streaming)."""
import json

import datasets
import numpy as np
import pytest
import torch

from train.config.run import DataConfig, TrainConfig, TrainerConfig
from train.data import build_data, check_batch_sizes, packing
from train.data.loader import DataModule, MapBlocks

G, B, T = 8, 2, 32


def make_cfg(cache_dir, seed=1234, **data):
    data = {"max_corpus_mb": 0.5, "tokenizer_vocab_size": 512, "val_fraction": 0.1, "cache_dir": str(cache_dir),
            **data}
    return TrainConfig(data=DataConfig(**data),
                       trainer=TrainerConfig(global_batch_size=G, micro_batch_size=B, seq_len=T, seed=seed))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="module")
def dm(cache):
    return build_data(make_cfg(cache))


def rows_of(micro_batches):
    return torch.cat([torch.cat([m["input_ids"], m["labels"][:, -1:]], dim=1) for m in micro_batches])


def test_batches_are_shifted_int64_blocks(dm):
    micro = dm.next_global_batch_for_rank()
    assert len(micro) == dm.grad_accum_steps == G // B
    for m in micro:
        assert m["input_ids"].dtype == m["labels"].dtype == torch.int64
        assert m["input_ids"].shape == m["labels"].shape == (B, T)
        assert torch.equal(m["input_ids"][:, 1:], m["labels"][:, :-1])
    assert dm.vocab_size == 512 and (dm.tokenizer_dir / "tokenizer.json").exists()
    # Documents are joined by EOS: the packed training data contains separators.
    assert (np.asarray(dm.train_blocks.blocks["input_ids"]) == dm.eos_token_id).any()


def test_second_build_reuses_the_packed_cache(cache, dm):
    calls = packing.TOKENIZE_CALLS
    again = build_data(make_cfg(cache))
    assert packing.TOKENIZE_CALLS == calls, "second build re-tokenised"
    assert list((cache / "packed" / dm.data_key).glob("*.arrow"))
    assert again.num_train_blocks == dm.num_train_blocks
    assert torch.equal(rows_of(again.global_batch_for_rank(3)), rows_of(dm.global_batch_for_rank(3)))


@pytest.mark.parametrize("world", [1, 2, 4])
def test_union_over_ranks_equals_single_rank(cache, dm, world):
    for step in (0, 1, 7):
        reference = rows_of(dm.global_batch_for_rank(step, 0, 1))
        parts = []
        for rank in range(world):
            ranked = build_data(make_cfg(cache), dp_rank=rank, dp_size=world)
            micro = ranked.global_batch_for_rank(step)
            assert len(micro) == G // (world * B)
            parts.append(rows_of(micro))
        assert torch.equal(torch.cat(parts), reference)


def test_resume_equals_running_through(cache):
    run = build_data(make_cfg(cache), dp_rank=1, dp_size=2)
    through = [rows_of(run.next_global_batch_for_rank()) for _ in range(6)]
    state = None
    first = build_data(make_cfg(cache), dp_rank=1, dp_size=2)
    for i, micro in enumerate(first.train_batches()):
        if i == 2:
            state = first.state_dict()
            break
    assert state["step"] == 3 and state["sequences_consumed"] == 3 * G
    resumed = build_data(make_cfg(cache), dp_rank=1, dp_size=2)
    resumed.load_state_dict(state)
    assert all(torch.equal(rows_of(resumed.next_global_batch_for_rank()), through[s]) for s in (3, 4, 5))


def test_resume_validates_seed_and_batch(dm):
    with pytest.raises(ValueError, match="trainer.seed"):
        dm.load_state_dict({**dm.state_dict(), "seed": 1})
    with pytest.raises(ValueError, match="trainer.global_batch_size"):
        dm.load_state_dict({**dm.state_dict(), "global_batch_size": 2 * G})


def test_different_seeds_differ(cache, dm):
    other = build_data(make_cfg(cache, seed=99))
    assert not torch.equal(rows_of(other.global_batch_for_rank(0)), rows_of(dm.global_batch_for_rank(0)))


def test_validation_is_fixed_and_held_out(cache, dm):
    a = torch.cat([m["input_ids"] for m in dm.val_batches(2)])
    b = torch.cat([m["input_ids"] for m in build_data(make_cfg(cache)).val_batches(2)])
    assert a.shape == (2 * G, T) and torch.equal(a, b)
    # Validation sequences never occur in training.
    train = {tuple(r) for r in np.asarray(dm.train_blocks.blocks["input_ids"]).tolist()}
    assert not any(tuple(r) in train for r in np.asarray(dm.val_blocks["input_ids"]).tolist())
    # Over ranks, validation reads the same sequences as one rank.
    halves = [torch.cat([m["input_ids"] for m in build_data(make_cfg(cache), r, 2).val_batches(2)]) for r in (0, 1)]
    assert torch.equal(torch.cat([halves[0][:G // 2], halves[1][:G // 2], halves[0][G // 2:], halves[1][G // 2:]]), a)


def test_epochs_are_permutations_and_span_seamlessly():
    n = 10
    blocks = datasets.Dataset.from_dict({"input_ids": [[i] * 3 for i in range(n)]}).with_format("numpy")
    source = MapBlocks(blocks, seed=5)
    order = source.rows(0, 3 * n)[:, 0]
    for e in range(3):
        assert sorted(order[e * n:(e + 1) * n].tolist()) == list(range(n))
        assert order[e * n:(e + 1) * n].tolist() == np.random.default_rng(5 + e).permutation(n).tolist()
    assert source.rows(8, 13)[:, 0].tolist() == order[8:13].tolist()
    # A global batch of 4 straddling the epoch boundary, read by 2 ranks.
    fake_tokenizer = type("FakeTokenizer", (), {"eos_token_id": 0, "pad_token_id": 1, "__len__": lambda s: 16})()
    module = DataModule(tokenizer=fake_tokenizer, tokenizer_dir=".", train_blocks=source, val_blocks=None,
                        seq_len=2, global_batch_size=4, micro_batch_size=1, dp_rank=0, dp_size=1, seed=5,
                        data_key="x")
    got = torch.cat([rows_of(module.global_batch_for_rank(2, r, 2)) for r in (0, 1)])[:, 0]
    assert got.tolist() == order[8:12].tolist()


def test_batch_size_errors_name_the_fields():
    with pytest.raises(ValueError, match=r"trainer\.global_batch_size=10.*trainer\.micro_batch_size") as err:
        check_batch_sizes(TrainerConfig(global_batch_size=10, micro_batch_size=4), 2)
    assert "[1, 5]" in str(err.value)
    assert check_batch_sizes(TrainerConfig(global_batch_size=16, micro_batch_size=2), 4) == 2


def test_files_source_end_to_end_and_too_small_corpus(tmp_path):
    lines = [json.dumps({"text": f"document number {i}: " + "some words here " * 20}) for i in range(30)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "b.txt").write_text("plain text document\n" * 50)
    paths = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt")]
    cfg = make_cfg(tmp_path / "cache", source="files", paths=paths, tokenizer_vocab_size=300, val_fraction=0.1)
    module = build_data(cfg)
    assert module.num_train_blocks >= G and module.num_val_blocks > 0
    assert rows_of(module.next_global_batch_for_rank()).shape == (G, T + 1)
    cfg.trainer.global_batch_size = 4096
    cfg.trainer.micro_batch_size = 1
    with pytest.raises(ValueError, match="fewer than one global batch"):
        build_data(cfg)


def test_streaming_order_is_world_size_independent_and_resumable(tmp_path):
    cfg = make_cfg(tmp_path / "cache", streaming=True, max_corpus_mb=0.15, val_fraction=0.2)
    single = build_data(cfg)
    reference = [rows_of(single.next_global_batch_for_rank()) for _ in range(3)]
    for world in (2,):
        ranks = [build_data(cfg, r, world) for r in range(world)]
        for step in range(3):
            assert torch.equal(torch.cat([rows_of(m.next_global_batch_for_rank()) for m in ranks]), reference[step])
    resumed = build_data(cfg, 1, 2)
    resumed.load_state_dict({"step": 2})
    assert torch.equal(rows_of(resumed.next_global_batch_for_rank()), reference[2][G // 2:])
    other = build_data(make_cfg(tmp_path / "cache", seed=7, streaming=True, max_corpus_mb=0.15, val_fraction=0.2))
    assert not torch.equal(rows_of(other.next_global_batch_for_rank()), reference[0])
    assert single.num_val_blocks > 0 and len(list(single.val_batches(1))) == G // B
