"""Tiny token corpora for the data tests: a 300-entry byte-level BPE saved as a tokenizer folder, and random
documents of token ids ending with EOS (id 0), as `python -m train.pretokenize` would write them."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from train.data.tokenizer import save_atomic, train_byte_bpe

EOS = 0


def tiny_tokenizer(out: Path) -> Path:
    """A 300-token builtin tokenizer (EOS id 0) saved at `out`."""
    save_atomic(train_byte_bpe(iter(["hello world foo bar baz"] * 50), 300), out)
    return out


def random_docs(rng: np.random.Generator, num_docs: int, lo: int = 5, hi: int = 40, max_id: int = 250) -> list:
    """`num_docs` documents of lo..hi-1 random ids in [2, max_id), each followed by EOS."""
    return [list(rng.integers(2, max_id, int(rng.integers(lo, hi)))) + [EOS] for _ in range(num_docs)]
