"""Token files on disk: Megatron's indexed format (read and written) and OLMo-core's headerless arrays (read).

Megatron (`megatron/core/datasets/indexed_dataset.py`), byte for byte:
- `PREFIX.bin`: the tokens of every sequence, C order, one dtype.
- `PREFIX.idx`, little-endian: magic `MMIDIDX\\x00\\x00`, `<Q` version 1, `<B` dtype code, `<Q` N sequences,
  `<Q` D = len(document_indices), then int32[N] sequence lengths, int64[N] byte offsets into `.bin`, int64[D]
  document indices (document i is sequences [di[i], di[i+1]); di[0] = 0). Multimodal `int8[N]` modes are not read.
  We write one document = one sequence (no sentence splitting), each ending with EOD, as `preprocess_data.py
  --append-eod` does.

OLMo-core: a flat array of token ids written with `np.memmap` (no header, usually named `.npy` although it is
not NumPy's format); the dtype comes from the config or from the vocabulary; documents end at EOS.

Both readers memory-map their files: opening one reads only the `.idx` header (and maps the rest), so the
resident memory of a reader does not grow with the corpus. Every problem is a `TokenFileError` naming the file
and the fix.

Shape letters: N sequences, D document-index entries (documents + 1).
"""
from __future__ import annotations

import glob
import os
import struct
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Union

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# Megatron's DType codes. Floats are listed so that a float file gets a precise refusal, not "unknown code".
DTYPE_BY_CODE = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
                 8: np.uint16}
CODE_BY_DTYPE = {np.dtype(v): k for k, v in DTYPE_BY_CODE.items()}
# Below this vocabulary size Megatron's preprocess_data.py writes uint16, else int32 (`DType.optimal_dtype`).
UINT16_VOCAB_LIMIT = 65500
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, N, D

PathLike = Union[str, os.PathLike]


class TokenFileError(ValueError):
    """A token file that cannot be used; the message names the file and the fix."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The token dtype Megatron's writer picks: uint16 below 65,500 entries, else int32."""
    return np.dtype(np.uint16 if vocab_size < UINT16_VOCAB_LIMIT else np.int32)


def headerless_dtype_for_vocab(vocab_size: int) -> np.dtype:
    """OLMo-core's rule: the smallest unsigned type that holds `vocab_size - 1`."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def bin_path(prefix: PathLike) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix: PathLike) -> Path:
    return Path(f"{prefix}.idx")


class IndexedWriter:
    """Writes one Megatron `PREFIX.bin` / `PREFIX.idx` pair, one document = one sequence.

    The files are written under temporary names and renamed into place by `finalize()` (the `.bin` first, the
    `.idx` last), so a pair whose `.idx` exists is complete: an interrupted writer leaves only `*.tmp` files.
    """

    def __init__(self, prefix: PathLike, dtype: Union[np.dtype, type]):
        self.prefix, self.dtype = Path(prefix), np.dtype(dtype)
        if self.dtype not in CODE_BY_DTYPE or self.dtype.kind == "f":
            raise TokenFileError(f"{self.prefix}: token dtype {self.dtype} is not an integer Megatron dtype")
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._bin_tmp = Path(f"{bin_path(self.prefix)}.tmp")
        self._bin = open(self._bin_tmp, "wb")
        self._lengths: List[int] = []
        self.num_tokens = 0
        self.max_token_id = -1

    def add_document(self, ids: Union[Sequence[int], np.ndarray]) -> None:
        """Append one document (its tokens, EOD included if wanted) as one sequence."""
        arr = np.asarray(ids)
        if arr.size:
            lo, hi = int(arr.min()), int(arr.max())
            info = np.iinfo(self.dtype)
            if lo < info.min or hi > info.max:
                raise TokenFileError(f"{self.prefix}: token id {hi if hi > info.max else lo} does not fit "
                                     f"{self.dtype}; write with a wider dtype")
            self.max_token_id = max(self.max_token_id, hi)
        self._bin.write(arr.astype(self.dtype, copy=False).tobytes(order="C"))
        self._lengths.append(int(arr.size))
        self.num_tokens += int(arr.size)

    def finalize(self) -> Path:
        """Close the `.bin`, write the `.idx`, and move both into place. Returns the prefix."""
        self._bin.close()
        lengths_N = np.asarray(self._lengths, dtype=np.int32)
        offsets_N = np.zeros(len(lengths_N), dtype=np.int64)
        if len(lengths_N) > 1:
            np.cumsum(lengths_N[:-1].astype(np.int64) * self.dtype.itemsize, out=offsets_N[1:])
        doc_indices_D = np.arange(len(lengths_N) + 1, dtype=np.int64)
        idx_tmp = Path(f"{idx_path(self.prefix)}.tmp")
        with open(idx_tmp, "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, CODE_BY_DTYPE[self.dtype], len(lengths_N), len(doc_indices_D)))
            f.write(lengths_N.tobytes(order="C"))
            f.write(offsets_N.tobytes(order="C"))
            f.write(doc_indices_D.tobytes(order="C"))
        os.replace(self._bin_tmp, bin_path(self.prefix))
        os.replace(idx_tmp, idx_path(self.prefix))
        return self.prefix


def write_indexed(prefix: PathLike, documents: Iterable[Sequence[int]], dtype) -> Path:
    """Write `documents` (each a sequence of token ids) as one Megatron pair; returns the prefix."""
    writer = IndexedWriter(prefix, dtype)
    for doc in documents:
        writer.add_document(doc)
    return writer.finalize()


class IndexedTokens:
    """A memory-mapped Megatron `.bin`/`.idx` pair, validated on open.

    `tokens` is the flat token array of the whole `.bin` (a memory map); document d spans tokens
    [`doc_start(d)`, `doc_start(d + 1)`). `name` is the prefix's file name (the source name in metrics).
    """

    kind = "megatron"

    def __init__(self, prefix: PathLike):
        self.prefix = Path(prefix)
        self.name = self.prefix.name
        idx, binf = idx_path(self.prefix), bin_path(self.prefix)
        for path in (idx, binf):
            if not path.is_file():
                raise TokenFileError(f"{path}: no such file; a Megatron corpus is PREFIX.bin + PREFIX.idx (give "
                                     f"data.paths the prefix without extension, or a directory of them)")
        idx_bytes = idx.stat().st_size
        with open(idx, "rb") as f:
            head = f.read(_HEADER.size)
        if len(head) < _HEADER.size or head[:9] != MAGIC:
            raise TokenFileError(f"{idx}: not a Megatron index (magic {head[:9]!r}, expected {MAGIC!r}); "
                                 "re-create it with python -m train.pretokenize or Megatron's preprocess_data.py")
        _, version, code, num_seqs, num_doc_idx = _HEADER.unpack(head)
        if version != VERSION:
            raise TokenFileError(f"{idx}: index version {version}, only version {VERSION} is supported; "
                                 "re-create it with python -m train.pretokenize")
        if code not in DTYPE_BY_CODE or np.dtype(DTYPE_BY_CODE[code]).kind == "f":
            raise TokenFileError(f"{idx}: dtype code {code} is not an integer token dtype (codes 1-5, 8); "
                                 "re-create it with python -m train.pretokenize")
        self.dtype = np.dtype(DTYPE_BY_CODE[code])
        self.num_sequences, self.num_docs = int(num_seqs), max(int(num_doc_idx) - 1, 0)
        needed = _HEADER.size + num_seqs * (4 + 8) + num_doc_idx * 8
        if idx_bytes < needed:
            raise TokenFileError(f"{idx}: truncated ({idx_bytes} bytes, its header needs {needed}); re-create it")
        off = _HEADER.size
        self.sequence_lengths = np.memmap(idx, np.int32, "r", off, (num_seqs,)) if num_seqs else np.zeros(0, np.int32)
        off += num_seqs * 4
        self.sequence_offsets = (np.memmap(idx, np.int64, "r", off, (num_seqs,)) if num_seqs
                                 else np.zeros(0, np.int64))
        off += num_seqs * 8
        self.document_indices = (np.memmap(idx, np.int64, "r", off, (num_doc_idx,)) if num_doc_idx
                                 else np.zeros(1, np.int64))
        size = binf.stat().st_size
        end = (int(self.sequence_offsets[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize
               if num_seqs else 0)
        if size < end:
            raise TokenFileError(f"{binf}: {size} bytes, shorter than its index says ({end}); the file is "
                                 "truncated: re-create it (python -m train.pretokenize reruns only missing shards)")
        self.num_tokens = end // self.dtype.itemsize
        self.tokens = (np.memmap(binf, self.dtype, "r", 0, (self.num_tokens,)) if self.num_tokens
                       else np.zeros(0, self.dtype))
        # One sequence per document (our writer, preprocess_data.py without --split-sentences) needs no copy.
        self._one_seq_per_doc = num_doc_idx == num_seqs + 1 and (
            num_seqs == 0 or (int(self.document_indices[1]) == 1 and int(self.document_indices[-1]) == num_seqs))
        self._doc_starts: Optional[np.ndarray] = None

    def _doc_start_bytes(self) -> np.ndarray:
        if self._one_seq_per_doc:
            return self.sequence_offsets
        if self._doc_starts is None:  # sentence-split corpora: one int64 per document, built on first use
            self._doc_starts = np.asarray(self.sequence_offsets[np.asarray(self.document_indices[:-1])])
        return self._doc_starts

    def doc_start(self, d: int) -> int:
        """First token of document d (`num_tokens` for d == num_docs)."""
        if d >= self.num_docs:
            return self.num_tokens
        return int(self._doc_start_bytes()[d]) // self.dtype.itemsize

    def document(self, d: int) -> np.ndarray:
        """The tokens of document d (a view into the memory map)."""
        if not 0 <= d < self.num_docs:
            raise IndexError(f"{self.prefix}: document {d} out of range [0, {self.num_docs})")
        return self.tokens[self.doc_start(d):self.doc_start(d + 1)]

    def doc_starts_between(self, start: int, stop: int) -> np.ndarray:
        """Token offsets s of document starts with start < s < stop (the boundaries inside a window)."""
        starts = self._doc_start_bytes()
        item = self.dtype.itemsize
        lo = np.searchsorted(starts, (start + 1) * item, side="left")
        hi = np.searchsorted(starts, stop * item, side="left")
        return np.asarray(starts[lo:hi], dtype=np.int64) // item

    def next_doc_start(self, pos: int) -> int:
        """The first document start at or after token `pos` (`num_tokens` if none)."""
        starts = self._doc_start_bytes()
        i = int(np.searchsorted(starts, pos * self.dtype.itemsize, side="left"))
        return self.num_tokens if i >= len(starts) else int(starts[i]) // self.dtype.itemsize

    def files(self) -> List[Path]:
        return [bin_path(self.prefix), idx_path(self.prefix)]


class HeaderlessTokens:
    """An OLMo-core token array: flat ids, no header, documents ending at `eos_id`. The dtype is given, or the
    smallest unsigned type that holds `vocab_size - 1` (OLMo-core's rule)."""

    kind = "headerless"

    def __init__(self, path: PathLike, eos_id: int, dtype=None, vocab_size: Optional[int] = None):
        self.path = self.prefix = Path(path)
        self.name = self.path.stem
        if not self.path.is_file():
            raise TokenFileError(f"{self.path}: no such file (data.paths names OLMo-core token arrays by their "
                                 "full file name, e.g. part-0.npy)")
        if dtype is None:
            if vocab_size is None:
                raise TokenFileError(f"{self.path}: a headerless token array needs its dtype (data.token_dtype) or "
                                     "the vocabulary size to infer it")
            dtype = headerless_dtype_for_vocab(vocab_size)
        self.dtype = np.dtype(dtype)
        if self.dtype.kind not in "ui":
            raise TokenFileError(f"{self.path}: token dtype {self.dtype} is not an integer type (data.token_dtype)")
        size = self.path.stat().st_size
        if size % self.dtype.itemsize:
            raise TokenFileError(f"{self.path}: {size} bytes is not a whole number of {self.dtype} tokens; the "
                                 "file is truncated or data.token_dtype is wrong")
        self.num_tokens = size // self.dtype.itemsize
        self.tokens = (np.memmap(self.path, self.dtype, "r", 0, (self.num_tokens,)) if self.num_tokens
                       else np.zeros(0, self.dtype))
        self.eos_id = int(eos_id)
        self.num_docs: Optional[int] = None  # not known without a scan of the whole file

    def doc_starts_between(self, start: int, stop: int) -> np.ndarray:
        """Token offsets s with start < s < stop that follow an EOS (document boundaries inside a window)."""
        window = np.asarray(self.tokens[start:max(stop - 1, start)])
        return np.flatnonzero(window == self.eos_id).astype(np.int64) + start + 1

    def next_doc_start(self, pos: int, chunk: int = 1 << 20) -> int:
        """The first document start at or after token `pos`: pos itself after an EOS (or at 0), else the token
        after the next EOS (`num_tokens` if none). Scans forward in chunks."""
        if pos <= 0 or pos >= self.num_tokens:
            return max(0, min(pos, self.num_tokens))
        at = pos - 1
        while at < self.num_tokens:
            hits = np.flatnonzero(np.asarray(self.tokens[at:at + chunk]) == self.eos_id)
            if len(hits):
                return at + int(hits[0]) + 1
            at += chunk
        return self.num_tokens

    def files(self) -> List[Path]:
        return [self.path]


TokenFile = Union[IndexedTokens, HeaderlessTokens]


def expand_token_paths(spec: PathLike) -> List[Path]:
    """The token files one `data.paths` entry names, in order: a Megatron prefix (PREFIX.bin/.idx), an
    OLMo-core array (`*.npy`), a directory (every prefix and `.npy` in it, sorted), or a glob of either."""
    text = os.path.expanduser(str(spec))
    if os.path.isdir(text):
        candidates = sorted(glob.glob(os.path.join(glob.escape(text), "*")))
    elif glob.has_magic(text):
        candidates = sorted(glob.glob(text))
    else:
        return [Path(text)]
    found: List[Path] = []
    for c in candidates:
        if c.endswith(".idx"):
            found.append(Path(c[:-4]))
        elif c.endswith(".npy"):
            found.append(Path(c))
        elif c.endswith(".bin") and not os.path.exists(c[:-4] + ".idx"):
            raise TokenFileError(f"{c}: a .bin without its .idx (data.paths={spec!r}); re-create the pair")
    if not found:
        raise TokenFileError(f"data.paths: {spec!r} names no token files (PREFIX.bin/.idx pairs or .npy arrays)")
    return found


def open_token_file(path: PathLike, *, eos_id: Optional[int] = None, dtype=None,
                    vocab_size: Optional[int] = None) -> TokenFile:
    """A reader for one token file: `.npy` → OLMo-core headerless array, anything else → Megatron prefix
    (a `.bin` or `.idx` suffix is stripped)."""
    text = str(path)
    if text.endswith(".npy"):
        if eos_id is None:
            raise TokenFileError(f"{text}: a headerless token array needs the EOS id to find documents")
        return HeaderlessTokens(text, eos_id, dtype, vocab_size)
    if text.endswith((".bin", ".idx")):
        text = text[:-4]
    return IndexedTokens(text)
