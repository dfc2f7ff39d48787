"""`python -m train.pretokenize` and `ensure_tokenized`: Megatron pairs + manifests, shards, restart, determinism
across worker counts, dtype by vocabulary, one-line errors, and the training cache reused without re-tokenizing."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from train.config.run import DataConfig
from train.data import pretokenize as pt
from train.data.indexed import IndexedTokens
from train.data.manifest import manifest_path, read_manifest, verify_manifest
from train.data.tokenizer import tokenizer_fingerprint
from train.pretokenize import main

ROOT = Path(__file__).resolve().parents[2]
TEXTS = [("" if i == 7 else f"def f{i}(x):\n    return x * {i}  # ünïcode ✓ <tag>\n" * (1 + i % 5))
         for i in range(60)]
NON_EMPTY = [t for t in TEXTS if t]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)))
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def cfg(corpus_file, cache_dir):
    return DataConfig(source="files", paths=[str(corpus_file)], tokenizer_vocab_size=300, max_corpus_mb=0.3,
                      cache_dir=cache_dir)


@pytest.fixture
def small_chunks(monkeypatch):
    """Many chunks from a small corpus, so that workers really share the work."""
    monkeypatch.setattr(pt, "CHUNK_DOCS", 4)
    monkeypatch.setattr(pt, "CHUNK_CHARS", 200)


def _documents(prefixes):
    docs = []
    for prefix in prefixes:
        tokens = IndexedTokens(prefix)
        docs += [np.asarray(tokens.document(d)).tolist() for d in range(tokens.num_docs)]
    return docs


def _files(prefixes):
    return {Path(f"{p}{ext}").name: Path(f"{p}{ext}").read_bytes() for p in prefixes for ext in (".bin", ".idx")}


def test_cli_end_to_end(corpus_file, cache_dir, tmp_path):
    out = tmp_path / "out" / "corpus"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "train.pretokenize", "--out", str(out), "--workers", "2",
                           "data=files", f"data.paths=[{corpus_file}]", "data.tokenizer_vocab_size=300",
                           f"data.cache_dir={cache_dir}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"num_docs", "num_tokens", "tokens_per_s", "workers", "outputs"} <= set(summary)
    assert summary["workers"] == 2 and summary["outputs"] == [str(out)] and summary["num_docs"] == len(NON_EMPTY)
    # Documents decode back to the source texts, each followed by EOD; the empty one is skipped.
    tok = AutoTokenizer.from_pretrained(str(out.parent / "tokenizer"), local_files_only=True)
    docs = _documents([out])
    assert [tok.decode(d[:-1]) for d in docs] == NON_EMPTY
    assert all(d[-1] == tok.eos_token_id for d in docs)
    assert docs[0][:-1] == tok(NON_EMPTY[0], add_special_tokens=False)["input_ids"]
    manifest = read_manifest(out)
    assert manifest_path(out).name == "corpus.manifest.json"
    verify_manifest(out, manifest, full_hash=True)
    assert manifest["files"]["bin"]["name"] == "corpus.bin" and manifest["files"]["idx"]["name"] == "corpus.idx"
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == len(tok) and manifest["eod_id"] == 0
    assert manifest["num_docs"] == len(NON_EMPTY) and manifest["docs"] == [0, len(TEXTS)]
    assert manifest["num_tokens"] == sum(map(len, docs)) == summary["num_tokens"]
    assert manifest["max_token_id"] == max(max(d) for d in docs)
    assert manifest["tokenizer"]["dir"] == "tokenizer"
    assert manifest["tokenizer"]["fingerprint"] == tokenizer_fingerprint(out.parent / "tokenizer")
    assert "tokenizer.json" in manifest["tokenizer"]["files"]
    assert manifest["source"]["source"] == "files" and manifest["source"]["paths"] == [str(corpus_file)]


def test_workers_give_identical_bytes_and_shards_cut_at_boundaries(cfg, small_chunks, tmp_path):
    one = pt.pretokenize(cfg, tmp_path / "w1" / "c", workers=1, shard_tokens=500, progress=False)
    two = pt.pretokenize(cfg, tmp_path / "w2" / "c", workers=2, shard_tokens=500, progress=False)
    assert len(one["outputs"]) >= 3
    assert _files(one["outputs"]) == _files(two["outputs"])
    whole = pt.pretokenize(cfg, tmp_path / "whole" / "c", workers=1, progress=False)
    assert _documents(one["outputs"]) == _documents(whole["outputs"])
    stop = 0
    for i, prefix in enumerate(one["outputs"]):
        m, tokens = read_manifest(prefix), IndexedTokens(prefix)
        assert Path(prefix).name == f"c_{i:05d}" and m["shard"]["index"] == i
        assert m["docs"][0] == stop and m["shard"]["last"] == (i == len(one["outputs"]) - 1)
        stop = m["docs"][1]
        if not m["shard"]["last"]:  # closed at the first document boundary at or past 500 tokens
            assert tokens.num_tokens >= 500 > tokens.num_tokens - len(tokens.document(tokens.num_docs - 1))
    assert stop == len(TEXTS)


def test_restart_rewrites_only_missing_or_truncated_shards(cfg, small_chunks, tmp_path):
    out = tmp_path / "c"
    first = pt.pretokenize(cfg, out, workers=1, shard_tokens=400, progress=False)
    prefixes = first["outputs"]
    assert len(prefixes) >= 4
    original = _files(prefixes)

    def stamps():
        return {p: os.stat(f"{p}{ext}").st_mtime_ns for p in prefixes for ext in (".bin", ".idx", ".manifest.json")}

    before = stamps()
    chunks = pt.TOKENIZED_CHUNKS
    again = pt.pretokenize(cfg, out, workers=1, shard_tokens=400, progress=False)
    assert pt.TOKENIZED_CHUNKS == chunks and again["kept_shards"] == len(prefixes) and stamps() == before
    # Delete one shard: only it is rewritten, from its neighbours' document ranges.
    for ext in (".bin", ".idx", ".manifest.json"):
        os.remove(f"{prefixes[1]}{ext}")
    redo = pt.pretokenize(cfg, out, workers=2, shard_tokens=400, progress=False)
    assert redo["written_shards"] == 1 and redo["outputs"] == prefixes and _files(prefixes) == original
    after = stamps()
    assert [p for p in prefixes if after[p] != before[p]] == [prefixes[1]]
    assert redo["tokenized_docs"] < len(TEXTS) / 2
    # A truncated .bin (its manifest's size no longer matches) is redone too; so is the tail after a lost last shard.
    with open(f"{prefixes[2]}.bin", "r+b") as f:
        f.truncate(10)
    os.remove(f"{prefixes[-1]}.manifest.json")
    redo = pt.pretokenize(cfg, out, workers=1, shard_tokens=400, progress=False)
    assert redo["written_shards"] == 2 and _files(prefixes) == original


def test_dtype_follows_vocabulary(cfg, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<unk>": 1, **{f"w{i}": i + 2 for i in range(70000)}}
    word = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    big_dir = tmp_path / "big_tok"
    PreTrainedTokenizerFast(tokenizer_object=word, eos_token="<eos>", unk_token="<unk>").save_pretrained(big_dir)
    corpus = tmp_path / "words.jsonl"
    corpus.write_text(json.dumps({"text": "w69999 w1 w0"}) + "\n" + json.dumps({"text": "w5"}) + "\n")
    big = DataConfig(source="files", paths=[str(corpus)], tokenizer=str(big_dir), cache_dir=cfg.cache_dir)
    summary = pt.pretokenize(big, tmp_path / "big" / "w", progress=False)
    m = read_manifest(summary["outputs"][0])
    assert m["dtype"] == "int32" and m["vocab_size"] == 70002 and m["max_token_id"] == 70001
    tokens = IndexedTokens(summary["outputs"][0])
    assert tokens.dtype == np.int32 and _documents(summary["outputs"]) == [[70001, 3, 2, 0], [7, 0]]
    small = pt.pretokenize(cfg, tmp_path / "small" / "w", progress=False)
    assert read_manifest(small["outputs"][0])["dtype"] == "uint16"
    assert IndexedTokens(small["outputs"][0]).dtype == np.uint16
    # token files of two tokenizers cannot share a tokenizer/ directory
    with pytest.raises(ValueError, match="another tokenizer"):
        pt.pretokenize(cfg, tmp_path / "big" / "other", progress=False)


@pytest.mark.parametrize("args, names", [
    (["data=files", "data.paths=[/nonexistent/docs.jsonl]"], "data.paths"),
    (["data.no_such_field=1"], "no_such_field"),
    (["--workers", "0"], "--workers"),
    (["--bogus"], "--bogus"),
])
def test_bad_inputs_are_one_line(args, names, cache_dir, tmp_path, capsys):
    assert main(["--out", str(tmp_path / "x"), f"data.cache_dir={cache_dir}", "data.max_corpus_mb=0.3",
                 "data.tokenizer_vocab_size=512", "--no-progress", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moeforge: ") and names in err[0], err


def test_ensure_tokenized_reuses_the_cache_and_streams_once(cache_dir, small_chunks):
    stdlib = DataConfig(source="stdlib", max_corpus_mb=0.3, tokenizer_vocab_size=512, cache_dir=cache_dir)
    prefixes, tok_dir = pt.ensure_tokenized(stdlib, workers=2, progress=False)
    assert all(Path(p).parent.parent == Path(cache_dir) / "tokens" for p in prefixes)
    assert Path(prefixes[0]).name == "stdlib_00000" and tok_dir == Path(prefixes[0]).parent / "tokenizer"
    chunks = pt.TOKENIZED_CHUNKS
    assert pt.ensure_tokenized(stdlib, progress=False) == (prefixes, tok_dir)
    assert pt.TOKENIZED_CHUNKS == chunks, "second call re-tokenized"
    # A stream is read once into token files of its own, with the same documents.
    streamed = DataConfig(**{**stdlib.__dict__, "streaming": True})
    s_prefixes, s_tok_dir = pt.ensure_tokenized(streamed, progress=False)
    assert s_prefixes != prefixes and _documents(s_prefixes) == _documents(prefixes)
    assert read_manifest(s_prefixes[0])["source"]["streaming"] is True
    assert tokenizer_fingerprint(s_tok_dir) == tokenizer_fingerprint(tok_dir)
