"""Tokenise and pack documents into fixed-length blocks of `seq_len + 1` tokens.

Documents are tokenised without special tokens, each followed by EOS, concatenated, and cut into blocks
(input = block[:-1], labels = block[1:]). Map-style corpora go through `datasets.Dataset.map(batched=True)`
with an explicit cache file under `cache_dir/packed/<key>/`, so a second run with the same corpus,
tokenizer and length loads the Arrow file instead of tokenising again; the tail of each map batch that does
not fill a block is dropped (under one block per `PACK_BATCH_DOCS` documents). Streams are packed on the
fly with the remainder carried over, so nothing is dropped.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Iterator, List

import datasets
import numpy as np

from train.data.tokenizer import tokenizer_fingerprint  # noqa: F401  (moved; re-exported)

PACK_BATCH_DOCS = 1000
_PACK_VERSION = 1
# Number of times a map batch was actually tokenised in this process (tests use it to see cache hits).
TOKENIZE_CALLS = 0


def pack_key(corpus_fingerprint: str, tokenizer_fp: str, seq_len: int, val_fraction: float) -> str:
    spec = {"v": _PACK_VERSION, "corpus": corpus_fingerprint, "tokenizer": tokenizer_fp, "seq_len": seq_len,
            "val_fraction": val_fraction, "batch": PACK_BATCH_DOCS}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _encode(tokenizer, texts: List[str]) -> List[List[int]]:
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                     return_token_type_ids=False)["input_ids"]


def _pack_batch(batch, tokenizer, eos_id: int, block_len: int):
    global TOKENIZE_CALLS
    TOKENIZE_CALLS += 1
    flat: List[int] = []
    for ids in _encode(tokenizer, batch["text"]):
        flat.extend(ids)
        flat.append(eos_id)
    num_blocks = len(flat) // block_len
    return {"input_ids": [flat[i * block_len:(i + 1) * block_len] for i in range(num_blocks)]}


def pack_dataset(docs: datasets.Dataset, tokenizer, seq_len: int, cache_file: Path,
                 num_proc: int = 1) -> datasets.Dataset:
    """Blocks of `seq_len + 1` token ids (column `input_ids`, numpy format) from a `text` dataset, cached
    in `cache_file` (reused as is when it exists, so the name must encode everything it depends on)."""
    block_len = seq_len + 1
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int32"), length=block_len)})
    packed = docs.map(
        _pack_batch, batched=True, batch_size=PACK_BATCH_DOCS, remove_columns=docs.column_names,
        fn_kwargs={"tokenizer": tokenizer, "eos_id": tokenizer.eos_token_id, "block_len": block_len},
        features=features, cache_file_name=str(cache_file), load_from_cache_file=True,
        new_fingerprint=cache_file.parent.name + "-" + cache_file.stem,
        num_proc=num_proc if num_proc > 1 and len(docs) >= 2 * num_proc else None,
        desc=f"tokenise+pack {cache_file.stem}")
    return packed.with_format("numpy")


def stream_blocks(texts: Iterable[str], tokenizer, seq_len: int, batch_docs: int = 64) -> Iterator[np.ndarray]:
    """Blocks of `seq_len + 1` ids (int64 arrays) from a text stream, in order, remainder carried over."""
    block_len, eos_id = seq_len + 1, tokenizer.eos_token_id
    buffer: List[int] = []
    pending: List[str] = []

    def drain(texts_chunk):
        for ids in _encode(tokenizer, texts_chunk):
            buffer.extend(ids)
            buffer.append(eos_id)
        start = 0
        while len(buffer) - start >= block_len:
            yield np.asarray(buffer[start:start + block_len], dtype=np.int64)
            start += block_len
        del buffer[:start]

    for text in texts:
        pending.append(text)
        if len(pending) >= batch_docs:
            yield from drain(pending)
            pending = []
    if pending:
        yield from drain(pending)
