"""Data pipeline: documents (`corpus`), tokenizer (`tokenizer`), token files (`indexed`), sources and windows
(`token_source`), the blended sample index (`blend`) and world-size-independent batches (`loader`). `build_data`
puts them together for one data-parallel rank; the checks on the files (`sources`) run there, before the model
exists, each failing with one line that names the file and the fix.

Names are imported on first use (PEP 562), so a tool that needs only the tokenizer and the token files
(`python -m train.pretokenize`) does not import torch through the loader; `datasets` and `transformers` are
imported only where documents are read or a Hugging Face tokenizer is used (a rank that trains on token files
imports neither)."""
from __future__ import annotations

import importlib

_WHERE = {"DataModule": "loader", "build_data": "build", "check_batch_sizes": "build",
          "load_tokenizer": "tokenizer", "ensure_tokenizer": "tokenizer", "open_tokenizer": "tokenizer",
          "tokenizer_info": "tokenizer", "TokenizerInfo": "tokenizer", "EOS_TOKEN": "tokenizer",
          "PAD_TOKEN": "tokenizer", "load_corpus": "corpus"}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"train.data.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'train.data' has no attribute {name!r}")


__all__ = sorted(_WHERE)
