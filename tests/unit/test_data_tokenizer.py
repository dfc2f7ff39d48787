"""Builtin byte-level BPE: trained on a small stdlib corpus, cached, saved in Hugging Face format."""
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from train.config.run import DataConfig
from train.data import tokenizer as tokmod
from train.data.corpus import load_corpus

SAMPLE = 'def f(x):\n    return x + 1  # ünïcode ✓ <tag>\n\n\tclass A: pass\n'


@pytest.fixture(scope="module")
def data_cfg(tmp_path_factory):
    return DataConfig(source="stdlib", max_corpus_mb=0.5, tokenizer_vocab_size=512,
                      cache_dir=str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def built(data_cfg):
    return tokmod.load_tokenizer(data_cfg)


def test_saved_in_hf_format_and_autotokenizer_round_trips(built):
    tok, tok_dir = built
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tok_dir / name).exists()
    loaded = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    assert len(loaded) == 512 == len(tok)
    assert loaded.eos_token == loaded.bos_token == "<|endoftext|>"
    assert loaded.pad_token == "<|pad|>" and loaded.pad_token_id != loaded.eos_token_id
    ids = loaded(SAMPLE, add_special_tokens=False)["input_ids"]
    assert loaded.decode(ids) == SAMPLE
    assert ids == tok(SAMPLE, add_special_tokens=False)["input_ids"]
    # The separator is a single token, never produced from ordinary text.
    assert loaded("<|endoftext|>", add_special_tokens=False)["input_ids"] == [loaded.eos_token_id]


def test_cache_is_reused_and_keyed_on_vocab(data_cfg, built, monkeypatch):
    _, tok_dir = built
    monkeypatch.setattr(tokmod, "train_byte_bpe", lambda *a, **k: pytest.fail("retrained despite cache"))
    assert tokmod.ensure_tokenizer(data_cfg) == tok_dir
    corpus = load_corpus(data_cfg)
    other = DataConfig(**{**data_cfg.__dict__, "tokenizer_vocab_size": 600})
    assert tokmod.builtin_tokenizer_key(corpus.fingerprint, other) != tok_dir.name


def test_atomic_save_keeps_the_first_copy(built, tmp_path):
    tok, _ = built
    target = tmp_path / "tok"
    tokmod.save_atomic(tok, target)
    before = (target / "tokenizer.json").read_bytes()
    tokmod.save_atomic(tok, target)  # a second builder losing the race
    assert (target / "tokenizer.json").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["tok"]  # no temporary directories left


def test_non_main_rank_waits_at_barrier_then_loads(data_cfg, built):
    calls = []
    tok, tok_dir = tokmod.load_tokenizer(data_cfg, is_main=False, barrier=lambda: calls.append(1))
    assert calls == [1] and tok_dir == built[1]


def test_local_tokenizer_path_is_passed_through(data_cfg, built):
    _, tok_dir = built
    cfg = DataConfig(**{**data_cfg.__dict__, "tokenizer": str(tok_dir)})
    tok, out = tokmod.load_tokenizer(cfg)
    assert Path(out) == tok_dir and len(tok) == 512


def test_builtin_tokenizer_on_an_hf_stream_reads_only_the_budget(tmp_path, monkeypatch):
    import json

    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    (tmp_path / "ds").mkdir()
    docs = [f"document {i}: " + "zebra quokka " * 40 for i in range(50)]
    (tmp_path / "ds" / "train.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    cfg = DataConfig(source="hf", name=str(tmp_path / "ds"), streaming=True, tokenizer_vocab_size=300,
                     max_corpus_mb=2e-3, cache_dir=str(tmp_path / "cache"))
    corpus = load_corpus(cfg)
    assert corpus.streaming
    read = list(tokmod._training_texts(corpus, cfg.max_corpus_mb))
    assert read == docs[: len(read)] and 1 < len(read) < len(docs)  # a prefix of the stream, in order
    tok = tokmod.open_tokenizer(tokmod.ensure_tokenizer(cfg, corpus))
    assert tok.decode(tok("zebra quokka")["input_ids"]) == "zebra quokka"


def _variant(src: Path, dest: Path, edit) -> Path:
    """A copy of tokenizer folder `src` whose tokenizer_config.json and special_tokens_map.json go through `edit`."""
    import json
    import shutil

    shutil.copytree(src, dest)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = dest / name
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    return dest


def test_tokenizer_info_matches_the_hf_tokenizer(built, tmp_path):
    """What training reads of a tokenizer (`tokenizer_info`, no transformers import for a plain folder) equals what
    the Hugging Face tokenizer says: for the builtin one, one without padding, one whose config names a special
    token outside the vocabulary (added on load: the HF path), and one without EOS (the same error)."""
    _, tok_dir = built
    without_pad = _variant(tok_dir, tmp_path / "no_pad", lambda c: {k: v for k, v in c.items() if k != "pad_token"})
    extra = _variant(tok_dir, tmp_path / "extra", lambda c: {**c, "mask_token": "<|mask|>"})
    assert tokmod._plain_info(tok_dir) is not None and tokmod._plain_info(without_pad) is not None
    assert tokmod._plain_info(extra) is None
    for folder in (tok_dir, without_pad, extra):
        hf = tokmod.open_tokenizer(folder)
        info = tokmod.tokenizer_info(folder)
        assert (len(info), info.eos_token_id, info.pad_token_id) == (len(hf), hf.eos_token_id, hf.pad_token_id)
    assert tokmod.tokenizer_info(without_pad).pad_token_id is None and len(tokmod.tokenizer_info(extra)) == 513
    no_eos = _variant(tok_dir, tmp_path / "no_eos",
                      lambda c: {k: v for k, v in c.items() if k not in ("eos_token", "bos_token")})
    with pytest.raises(ValueError, match="has no eos_token"):
        tokmod.tokenizer_info(no_eos)
