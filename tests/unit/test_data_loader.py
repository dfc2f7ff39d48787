"""The default path (data=stdlib: tokenized into shards by ensure_tokenized, then read like data=tokens as one
source named stdlib) and the loader's world-size-independent order."""
import numpy as np
import pytest
import torch

from train.config.run import DataConfig, TrainConfig, TrainerConfig
from train.data import build_data, check_batch_sizes

G, B, T = 8, 2, 32


def make_cfg(cache_dir, seed=1234, **data):
    data = {"max_corpus_mb": 0.5, "tokenizer_vocab_size": 512, "val_fraction": 0.1, "cache_dir": str(cache_dir),
            **data}
    cfg = TrainConfig(data=DataConfig(**data), trainer=TrainerConfig(global_batch_size=G, micro_batch_size=B,
                                                                     seq_len=T, seed=seed, max_steps=50))
    cfg.model.vocab_size = 512
    return cfg


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="module")
def dm(cache):
    return build_data(make_cfg(cache))


def rows_of(micro_batches):
    return torch.cat([torch.cat([m["input_ids"], m["labels"][:, -1:]], dim=1) for m in micro_batches])


def test_default_source_is_one_token_source(dm):
    assert dm.source_names == ["stdlib"] and dm.vocab_size == 512
    assert (dm.tokenizer_dir / "tokenizer.json").exists()
    micro = dm.global_batch_for_rank(0)
    assert len(micro) == dm.grad_accum_steps == G // B
    for m in micro:
        assert m["input_ids"].dtype == m["labels"].dtype == torch.int64 and m["input_ids"].shape == (B, T)
        assert torch.equal(m["input_ids"][:, 1:], m["labels"][:, :-1])
    src = dm.sources[0]
    assert (src.read(0, min(src.num_tokens, 100_000)) == dm.eos_token_id).any()  # documents joined by EOS


@pytest.mark.parametrize("world", [1, 2, 4])
def test_union_over_ranks_equals_single_rank(cache, dm, world):
    ranks = [build_data(make_cfg(cache), r, world) for r in range(world)]
    for step in (0, 1, 7):
        assert torch.equal(torch.cat([rows_of(d.global_batch_for_rank(step)) for d in ranks]),
                           rows_of(dm.global_batch_for_rank(step)))


def test_resume_equals_running_through(cache):
    a = build_data(make_cfg(cache))
    through = [rows_of(a.next_global_batch_for_rank()) for _ in range(6)]
    b = build_data(make_cfg(cache), 1, 2)
    b.load_state_dict({**a.state_dict(), "step": 3})
    c = build_data(make_cfg(cache), 0, 2)
    c.load_state_dict({**a.state_dict(), "step": 3})
    for s in range(3, 6):
        pair = [rows_of(c.next_global_batch_for_rank()), rows_of(b.next_global_batch_for_rank())]
        assert torch.equal(torch.cat(pair),
                           through[s])
    for d in (a, b, c):
        d.close()


def test_resume_validates_seed_and_batch(dm):
    with pytest.raises(ValueError, match="trainer.seed"):
        dm.load_state_dict({**dm.state_dict(), "seed": 1})
    with pytest.raises(ValueError, match="trainer.global_batch_size"):
        dm.load_state_dict({**dm.state_dict(), "global_batch_size": 4})


def test_validation_is_fixed_and_held_out(dm):
    first = rows_of(list(dm.val_batches(0, 2)))
    assert torch.equal(first, rows_of(list(dm.val_batches(0, 2))))
    src = dm.sources[0]
    assert np.array_equal(first[0].numpy(), src.read(src.cut, src.cut + T + 1))


def test_batch_size_errors_name_the_fields():
    with pytest.raises(ValueError, match="trainer.global_batch_size"):
        check_batch_sizes(TrainerConfig(global_batch_size=10, micro_batch_size=4), 2)
