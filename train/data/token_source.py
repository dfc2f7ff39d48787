"""One token source: its files concatenated in order, cut into training and validation windows.

Windows follow Megatron's GPTDataset: window i of a region starting at token a is tokens [a + i·L, a + i·L + L + 1)
(L = seq_len): input = window[:-1], labels = window[1:], so consecutive windows share one token and every token
is predicted once. Windows may span a file boundary (the slices are concatenated).

The last `val_fraction` of a source's tokens, the cut moved forward to the next document start (or back to the last
one that leaves a whole validation window, in a small corpus), are its held-out documents: training windows lie in [0, cut), validation windows in [cut, end). Nothing is read on construction
except the files' headers (everything is memory-mapped).
"""
from __future__ import annotations

import math
from typing import List, Sequence

import numpy as np

from train.data.indexed import TokenFile


class TokenSource:
    """The files of one `data.paths` entry (`files`, in order) under one `name`."""

    def __init__(self, name: str, files: Sequence[TokenFile], seq_len: int, val_fraction: float):
        self.name, self.files, self.seq_len = name, list(files), seq_len
        sizes = [f.num_tokens for f in self.files]
        self.file_starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.num_tokens = int(self.file_starts[-1])
        self.cut = self._val_cut(val_fraction)
        self.num_train_windows = self._num_windows(self.cut)
        self.num_val_windows = self._num_windows(self.num_tokens - self.cut)

    def _val_cut(self, val_fraction: float) -> int:
        """Where the held-out documents start: the first document start at or after the last `val_fraction` of the
        tokens; when that leaves no whole validation window (a small corpus whose last document is long), the last
        document start before it instead, so a source of several documents always holds one out."""
        if val_fraction <= 0 or not self.num_tokens:
            return self.num_tokens
        target = int(math.ceil(self.num_tokens * (1.0 - val_fraction)))
        cut = self.next_doc_start(target)
        if self._num_windows(self.num_tokens - cut) > 0:
            return cut
        span = self.seq_len + 1
        while span < 2 * self.num_tokens:  # widen the backward search; a scan only where documents are long
            lo = max(self.num_tokens - span - self.seq_len - 1, 0)
            starts = self.doc_starts_between(lo, self.num_tokens - self.seq_len)
            if len(starts):
                return int(starts[-1])
            if lo == 0:
                break
            span *= 4
        return cut

    def _num_windows(self, num_tokens: int) -> int:
        return max(num_tokens - 1, 0) // self.seq_len

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the concatenation (int64), across file boundaries."""
        out = np.empty(stop - start, dtype=np.int64)
        f = int(np.searchsorted(self.file_starts, start, side="right")) - 1
        at = start
        while at < stop:
            lo = at - int(self.file_starts[f])
            take = min(stop, int(self.file_starts[f + 1])) - at
            out[at - start:at - start + take] = self.files[f].tokens[lo:lo + take]
            at += take
            f += 1
        return out

    def next_doc_start(self, pos: int) -> int:
        """The first document start at or after token `pos` (a file start is a document start)."""
        f = int(np.searchsorted(self.file_starts, pos, side="right")) - 1
        if f >= len(self.files):
            return self.num_tokens
        base = int(self.file_starts[f])
        return base + self.files[f].next_doc_start(pos - base)

    def doc_starts_between(self, start: int, stop: int) -> np.ndarray:
        """Document starts s with start < s < stop (int64), file starts included."""
        found: List[np.ndarray] = []
        for f, tf in enumerate(self.files):
            base, end = int(self.file_starts[f]), int(self.file_starts[f + 1])
            if end <= start or base >= stop:
                continue
            if start < base:
                found.append(np.array([base], dtype=np.int64))
            found.append(tf.doc_starts_between(max(start - base, 0), min(stop, end) - base) + base)
        return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)

    def window_start(self, window: int, val: bool = False) -> int:
        return (self.cut if val else 0) + window * self.seq_len

    def windows(self, ids: np.ndarray, val: bool = False) -> np.ndarray:
        """(len(ids), L + 1) int64 token windows (training windows, or validation windows when `val`)."""
        L = self.seq_len
        rows = np.empty((len(ids), L + 1), dtype=np.int64)
        for i, w in enumerate(ids):
            a = self.window_start(int(w), val)
            rows[i] = self.read(a, a + L + 1)
        return rows

    def document_ids(self, ids: np.ndarray, val: bool = False) -> np.ndarray:
        """(len(ids), L) int32: per row, the index (from 0) of the document each input position belongs to."""
        L = self.seq_len
        out = np.empty((len(ids), L), dtype=np.int32)
        positions = np.arange(L)
        for i, w in enumerate(ids):
            a = self.window_start(int(w), val)
            bounds = self.doc_starts_between(a, a + L) - a
            out[i] = np.searchsorted(bounds, positions, side="right")
        return out
