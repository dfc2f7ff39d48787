"""Training from token files (data=tokens): window contents, world-size-independent batches and resume,
document ids, held-out regions, OLMo-core arrays, and the bad inputs (one line naming the file)."""
import logging

import numpy as np
import pytest
import torch

from train.config.run import DataConfig, TrainConfig, TrainerConfig
from train.data import build_data
from train.data.indexed import TokenFileError, write_indexed
from train.data.sources import DataError
from tests.token_data import EOS, random_docs, tiny_tokenizer
from train.trainer.validate import ConfigError, validate_config

G, B, L = 8, 2, 16


@pytest.fixture(scope="module")
def tokdir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    tiny_tokenizer(out)
    return out


def docs(rng, n, lo=5, hi=40):
    return random_docs(rng, n, lo, hi)


def make_cfg(tmp_path, tokdir, paths, weights=None, max_steps=40, **data):
    data = {"tokenizer": str(tokdir), "val_fraction": 0.1, **data}
    cfg = TrainConfig(data=DataConfig(source="tokens", paths=[str(p) for p in paths], weights=weights,
                                      cache_dir=str(tmp_path / "cache"), **data),
                      trainer=TrainerConfig(global_batch_size=G, micro_batch_size=B, seq_len=L, max_steps=max_steps))
    cfg.model.vocab_size = 512
    return cfg


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    a = [write_indexed(tmp_path / "web" / f"part-{i}", docs(rng, 60), np.uint16) for i in range(2)]
    b = write_indexed(tmp_path / "code", docs(rng, 40), np.int32)
    return tmp_path / "web", b, a


def rows_of(micro):
    return torch.cat([torch.cat([m["input_ids"], m["labels"][:, -1:]], dim=1) for m in micro])


def test_windows_are_the_concatenated_tokens_across_a_file_boundary(tmp_path, tokdir, corpus):
    web_dir, _, parts = corpus
    dm = build_data(make_cfg(tmp_path, tokdir, [web_dir], val_fraction=0.0))
    src = dm.sources[0]
    assert dm.source_names == ["web"] and len(src.files) == 2
    flat = np.concatenate([np.asarray(f.tokens, dtype=np.int64) for f in src.files])
    boundary = src.files[0].num_tokens
    w = boundary // L  # the window that spans the two files
    assert w * L < boundary < w * L + L + 1
    assert np.array_equal(src.windows(np.array([w]))[0], flat[w * L:w * L + L + 1])
    for step in range(3):  # every row of every batch is some window's tokens
        for row in rows_of(dm.global_batch_for_rank(step)).numpy():
            starts = [i for i in range(src.num_train_windows) if np.array_equal(flat[i * L:i * L + L + 1], row)]
            assert starts
    micro = dm.global_batch_for_rank(0)
    assert len(micro) == G // B and micro[0]["input_ids"].dtype == torch.int64
    assert torch.equal(micro[0]["input_ids"][:, 1:], micro[0]["labels"][:, :-1])


@pytest.mark.parametrize("world", [2, 4])
def test_union_over_ranks_is_the_single_rank_batch_and_resume_continues(tmp_path, tokdir, corpus, world):
    web, code, _ = corpus
    cfg = make_cfg(tmp_path, tokdir, [web, code], [0.8, 0.2])
    one = build_data(cfg)
    ranks = [build_data(cfg, r, world) for r in range(world)]
    for step in (0, 1, 5, 39):
        ref = rows_of(one.global_batch_for_rank(step))
        assert torch.equal(torch.cat([rows_of(d.global_batch_for_rank(step)) for d in ranks]), ref)
    # 5 steps on one rank, then resume on `world` ranks: the same rows as running on
    for _ in range(5):
        one.next_global_batch_for_rank()
    state = one.state_dict()
    assert state["step"] == 5 and state["sequences_consumed"] == 5 * G
    for d in ranks:
        d.load_state_dict(state)
    for _ in range(3):
        ref = rows_of(one.next_global_batch_for_rank())
        assert torch.equal(torch.cat([rows_of(d.next_global_batch_for_rank()) for d in ranks]), ref)
    assert ranks[0].samples_per_source() == one.samples_per_source()
    counts = one.samples_per_source()
    assert sum(counts.values()) == 8 * G and abs(counts["web"] - 0.8 * 8 * G) < 1
    for d in (one, *ranks):
        d.close()


def test_resume_checks_name_what_differs(tmp_path, tokdir, corpus):
    web, code, _ = corpus
    dm = build_data(make_cfg(tmp_path, tokdir, [web, code], [0.8, 0.2]))
    with pytest.raises(ValueError, match="trainer.seed"):
        dm.load_state_dict({**dm.state_dict(), "seed": 1})
    state = dm.state_dict()
    with open(f"{code}.bin", "ab") as f:  # the file changes under the cached index
        f.write(b"\0\0\0\0")
    again = build_data(make_cfg(tmp_path, tokdir, [web, code], [0.8, 0.2]))
    with pytest.raises(ValueError, match=rf"{code}.bin: changed since the checkpoint"):
        again.load_state_dict(state)
    # raising max_steps keeps the data identity and continues the same samples (prefix-stable index)
    longer = build_data(make_cfg(tmp_path, tokdir, [web, code], [0.8, 0.2], max_steps=80))
    longer.load_state_dict(again.state_dict())
    assert torch.equal(rows_of(longer.global_batch_for_rank(7)), rows_of(again.global_batch_for_rank(7)))


def test_document_ids_hand_worked(tmp_path, tokdir):
    # documents of 5, 3, 10 and 20 tokens (EOD last): starts at 0, 5, 8, 18
    rng = np.random.default_rng(1)
    lengths = [5, 3, 10, 20]
    write_indexed(tmp_path / "d", [list(rng.integers(2, 250, n - 1)) + [EOS] for n in lengths], np.uint16)
    cfg = make_cfg(tmp_path, tokdir, [tmp_path / "d"], val_fraction=0.0, document_mask=True)
    cfg.trainer.seq_len = 8
    src = build_data(cfg).sources[0]
    got = src.document_ids(np.array([0, 1, 2]))
    assert got.dtype == np.int32
    assert got[0].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]  # tokens 0-7: doc 0 is 0-4 (EOD at 4), doc 1 is 5-7
    assert got[1].tolist() == [0, 0, 0, 0, 0, 0, 0, 0]  # tokens 8-15: inside doc 2
    assert got[2].tolist() == [0, 0, 1, 1, 1, 1, 1, 1]  # tokens 16-23: doc 2 ends at 17, doc 3 starts at 18


def test_val_region_starts_at_a_document_and_is_held_out(tmp_path, tokdir, corpus, caplog):
    web, code, _ = corpus
    dm = build_data(make_cfg(tmp_path, tokdir, [web, code], [0.8, 0.2]))
    for i, src in enumerate(dm.sources):
        assert src.cut == src.next_doc_start(src.cut) and src.cut < src.num_tokens
        assert src.num_train_windows * L + 1 <= src.cut
        batches = list(dm.val_batches(i, 2))
        assert len(batches) == 2 * G // B
        first = rows_of(batches[:G // B])[0].numpy()
        assert np.array_equal(first, src.read(src.cut, src.cut + L + 1))
        assert torch.equal(rows_of(list(dm.val_batches(i, 2))), rows_of(batches))  # fixed


def test_small_source_repeats_and_says_so(tmp_path, tokdir, corpus, caplog):
    web, code, _ = corpus
    with caplog.at_level(logging.INFO, logger="train"):
        build_data(make_cfg(tmp_path, tokdir, [web, code], [0.2, 0.8], max_steps=200))
    assert any("source code repeats" in r.message and "epochs of its" in r.message for r in caplog.records)


def test_headerless_arrays(tmp_path, tokdir):
    rng = np.random.default_rng(2)
    flat = np.concatenate([np.asarray(d) for d in docs(rng, 80)]).astype(np.uint32)
    flat.tofile(tmp_path / "olmo.npy")
    dm = build_data(make_cfg(tmp_path, tokdir, [tmp_path / "olmo.npy"], token_dtype="uint32"))
    src = dm.sources[0]
    assert dm.source_names == ["olmo"] and src.num_tokens == len(flat)
    assert flat[src.cut - 1] == EOS  # the held-out part starts after an EOS
    assert np.array_equal(src.windows(np.array([3]))[0], flat[3 * L:4 * L + 1])


def bad_message(tmp_path, tokdir, paths, weights=None, validate=False, **data):
    cfg = make_cfg(tmp_path, tokdir, paths, weights, **data)
    with pytest.raises((ConfigError, TokenFileError, DataError)) as err:
        if validate:
            validate_config(cfg, 1)
        build_data(cfg)
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize("weights", [[1.0, -1.0], [1.0, 0.0], [1.0, float("nan")], [1.0]])
def test_bad_weights_are_config_errors(tmp_path, tokdir, corpus, weights):
    web, code, _ = corpus
    assert "data.weights" in bad_message(tmp_path, tokdir, [web, code], weights, validate=True)


def test_bad_files_name_the_file(tmp_path, tokdir, corpus):
    web, code, _ = corpus
    assert f"{tmp_path / 'nope'}.idx" in bad_message(tmp_path, tokdir, [web, tmp_path / "nope"])
    write_indexed(tmp_path / "empty", [], np.uint16)
    assert str(tmp_path / "empty") in bad_message(tmp_path, tokdir, [web, tmp_path / "empty"])
    write_indexed(tmp_path / "big", [[5, 700, 3, EOS]] * 50, np.uint16)
    msg = bad_message(tmp_path, tokdir, [tmp_path / "big"])
    assert f"{tmp_path / 'big'}.bin" in msg and "700" in msg and "model.vocab_size" in msg
    (tmp_path / "dup").mkdir()
    write_indexed(tmp_path / "dup" / "code", docs(np.random.default_rng(3), 30), np.uint16)
    assert "data.paths" in bad_message(tmp_path, tokdir, [code, tmp_path / "dup" / "code"])
    no_tok = make_cfg(tmp_path, tokdir, [code], tokenizer=None)
    with pytest.raises(DataError, match=f"{code}: no manifest names a tokenizer"):
        build_data(no_tok)


def test_small_corpus_with_a_long_last_document_still_holds_one_out(tmp_path):
    """1% past the last document start leaves no window: the cut moves back to that start instead."""
    from train.data.indexed import IndexedTokens
    from train.data.token_source import TokenSource

    docs = [[5] * 30 + [0], [6] * 30 + [0], [7] * 200 + [0]]
    write_indexed(tmp_path / "c", docs, np.uint16)
    source = TokenSource("c", [IndexedTokens(tmp_path / "c")], seq_len=16, val_fraction=0.01)
    assert source.cut == 62  # the last document's start
    assert source.num_val_windows == 200 // 16 and source.num_train_windows == 61 // 16
    one_doc = tmp_path / "one"
    write_indexed(one_doc, [[5] * 100 + [0]], np.uint16)
    assert TokenSource("one", [IndexedTokens(one_doc)], 16, 0.01).num_val_windows == 0  # nothing to hold out


def test_a_token_file_changed_after_its_manifest_is_named(tmp_path, tokdir, monkeypatch):
    """Truncated: caught by size. Rewritten with the same size: its modification time differs from the manifest's,
    so it is hashed and caught. Only touched (a copy): hashed once, then remembered. A rewrite that also restored
    the time is caught only by data.verify_tokens=true (a full read at every start)."""
    import os

    from train.data import manifest as manifest_mod
    from train.data.manifest import write_manifest

    prefix = write_indexed(tmp_path / "web", docs(np.random.default_rng(5), 60), np.uint16)
    write_manifest(prefix)
    binf = tmp_path / "web.bin"
    original, stamp = binf.read_bytes(), os.stat(binf)
    build_data(make_cfg(tmp_path, tokdir, [prefix]))

    hashed = []
    real_sha = manifest_mod.sha256_file
    monkeypatch.setattr(manifest_mod, "sha256_file", lambda p, *a: hashed.append(p) or real_sha(p, *a))
    os.utime(binf, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))  # copied: same bytes, new time
    build_data(make_cfg(tmp_path, tokdir, [prefix]))
    build_data(make_cfg(tmp_path, tokdir, [prefix]))
    assert hashed == [binf]  # hashed on the first start after the copy only

    changed = bytearray(original)
    changed[10] ^= 0x01  # one token id differs, same size
    binf.write_bytes(bytes(changed))
    with pytest.raises(TokenFileError, match=f"{binf}: changed after it was written \\(SHA-256 differs"):
        build_data(make_cfg(tmp_path, tokdir, [prefix]))
    os.utime(binf, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # ... and the time put back
    build_data(make_cfg(tmp_path, tokdir, [prefix]))  # the default start cannot see it
    with pytest.raises(TokenFileError, match=f"{binf}: changed after it was written"):
        build_data(make_cfg(tmp_path, tokdir, [prefix], verify_tokens=True))

    binf.write_bytes(original[:-8])  # truncated
    with pytest.raises(TokenFileError, match=f"{binf}: changed after it was written \\({len(original) - 8} bytes"):
        build_data(make_cfg(tmp_path, tokdir, [prefix]))
