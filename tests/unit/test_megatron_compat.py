"""Our token files and Megatron-Core's (`megatron-core==0.16.1`, a dev dependency): Megatron's `IndexedDataset` reads
what `pretokenize` writes, and our `IndexedTokens` reads what Megatron's `IndexedDatasetBuilder` writes, document
for document; our writer's bytes equal the builder's.

Without megatron-core the module is skipped, except under CI (`CI` set), where the dev extra must be installed."""
import json
import os
import warnings

import numpy as np
import pytest
import torch

from train.config.run import DataConfig
from train.data import pretokenize as pt
from train.data.indexed import IndexedTokens, write_indexed


def _import_megatron():
    with warnings.catch_warnings():  # deprecation and "Transformer Engine not installed" notices on import
        warnings.simplefilter("ignore")
        if os.environ.get("CI"):
            import megatron.core.datasets.indexed_dataset as module  # a dev dependency: CI must have it
            return module
        return pytest.importorskip("megatron.core.datasets.indexed_dataset")


mc = _import_megatron()

DOCS = [[5, 6, 7, 0], [1, 0], [65499, 3, 0], [0], [9] * 300 + [0]]


def _ours(prefix):
    tokens = IndexedTokens(prefix)
    return [np.asarray(tokens.document(d)).tolist() for d in range(tokens.num_docs)]


def test_megatron_reads_pretokenize_output(tmp_path, monkeypatch):
    monkeypatch.setattr(pt, "CHUNK_DOCS", 3)
    texts = [f"def g{i}(y):\n    return y ** {i}  # ✓\n" * (1 + i % 4) for i in range(40)]
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg = DataConfig(source="files", paths=[str(corpus)], tokenizer_vocab_size=300, cache_dir=str(tmp_path / "c"))
    summary = pt.pretokenize(cfg, tmp_path / "out" / "docs", workers=2, shard_tokens=300, progress=False)
    assert len(summary["outputs"]) > 1
    total = 0
    for prefix in summary["outputs"]:
        theirs = mc.IndexedDataset(prefix)
        ours = _ours(prefix)
        assert len(theirs) == len(ours) > 0
        assert [theirs[i].tolist() for i in range(len(theirs))] == ours
        assert theirs[0].dtype == np.uint16
        assert theirs.document_indices.tolist() == list(range(len(ours) + 1))
        total += len(ours)
    assert total == len(texts)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_we_read_megatron_builder_output(tmp_path, dtype):
    prefix = tmp_path / "megatron"
    builder = mc.IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in DOCS:
        builder.add_document(torch.tensor(doc), [len(doc)])
    builder.finalize(f"{prefix}.idx")
    assert _ours(prefix) == DOCS and IndexedTokens(prefix).dtype == np.dtype(dtype)
    write_indexed(tmp_path / "ours", DOCS, dtype)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"megatron{ext}").read_bytes()


def test_we_read_sentence_split_documents(tmp_path):
    """preprocess_data.py --split-sentences: several sequences per document; a document is their concatenation."""
    prefix = tmp_path / "split"
    builder = mc.IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    builder.add_document(torch.tensor([1, 2, 3, 4, 5]), [2, 3])
    builder.add_document(torch.tensor([6, 0]), [2])
    builder.finalize(f"{prefix}.idx")
    assert _ours(prefix) == [[1, 2, 3, 4, 5], [6, 0]]


def test_a_megatron_written_corpus_trains_directly(tmp_path):
    """A corpus from Megatron's own builder (no manifest) trains with data=tokens and data.tokenizer: the rows of
    the first step are windows of its documents, and a training step runs on them."""
    from parallel import Mesh
    from train.config import load_train_config
    from tests.token_data import random_docs, tiny_tokenizer
    from train.trainer.loop import Trainer
    from train.trainer.validate import validate_config

    tok = tmp_path / "tokenizer"
    tiny_tokenizer(tok)
    rng = np.random.default_rng(3)
    docs = random_docs(rng, 40, lo=8, max_id=290)
    builder = mc.IndexedDatasetBuilder(str(tmp_path / "meg.bin"), dtype=np.uint16)
    for doc in docs:
        builder.add_document(torch.tensor(doc), [len(doc)])
    builder.finalize(str(tmp_path / "meg.idx"))
    cfg = load_train_config(["model=tiny_mixtral", "model.vocab_size=512", "data=tokens",
                             f"data.paths=[{tmp_path / 'meg'}]", f"data.tokenizer={tok}", "data.document_mask=true",
                             f"data.cache_dir={tmp_path / 'cache'}", f"trainer.run_dir={tmp_path / 'run'}",
                             "trainer.seq_len=16", "trainer.global_batch_size=2", "trainer.micro_batch_size=2",
                             "trainer.max_steps=2", "trainer.eval_every=0", "logging.progress=false"])
    validate_config(cfg, world_size=1)
    trainer = Trainer(cfg, Mesh())
    try:
        flat = np.concatenate(docs)
        (mb,) = trainer.data.global_batch_for_rank(0)
        for row, labels in zip(mb["input_ids"].numpy(), mb["labels"].numpy()):
            start = next(i for i in range(len(flat) - 16) if (flat[i:i + 16] == row).all())
            assert (flat[start + 1:start + 17] == labels).all()
        assert mb["document_ids"].shape == mb["input_ids"].shape
        trainer.fit()
        records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in records if "loss" in r]
        assert len(losses) == 2 and all(np.isfinite(losses))
        assert records[-1]["data/samples/meg"] == 4
    finally:
        trainer.close()
