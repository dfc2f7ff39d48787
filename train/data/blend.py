"""The blended sample index: which source and which window every global sample position reads.

Source order. Source s with normalised weight w_s gets its k-th sample at "time" (k + 1/2) / w_s; the global order
is the merge of all sources' times (ties go to the lower source index). The first N entries of a merge do not
depend on N (prefix-stable: raising `trainer.max_steps` continues the same samples), the merge is vectorised chunk
by chunk (no Python loop per sample), and in every prefix each source's count is within one sample of N·w_s
(`check_blend_bounds` in the tests checks every prefix).

Window order. Source s's k-th sample is window `perm_{s,e}[k mod W_s]` of its W_s training windows, e = k // W_s,
the permutation drawn from `numpy.random.default_rng((seed, s, e))`: a source smaller than its share repeats,
reshuffled every epoch.

The index (`source_ids`, `window_ids`) and per-chunk cumulative counts are `.npy` files under
`cache_root(data)/indices/<key>/`, written once into memory maps (so building them holds one chunk in memory) and
renamed into place, then memory-mapped by every rank. Per-source counts at any position cost one chunk of bincount
(`samples_per_source`), whatever the position: resuming late costs what resuming early costs.

Shape letters: S sources, N samples, C chunk positions.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from train.data.atomic import publish_dir

INDEX_VERSION = 1
CHUNK = 1 << 20  # samples per building chunk, and the spacing of the stored cumulative counts


def normalise(weights: Sequence[float]) -> np.ndarray:
    w_S = np.asarray(weights, dtype=np.float64)
    return w_S / w_S.sum()


def _times(w: float, ks: np.ndarray) -> np.ndarray:
    return (ks + 0.5) / w


def blend_chunk(w_S: np.ndarray, counts_S: np.ndarray, n: int) -> np.ndarray:
    """The source ids of the next `n` positions of the merge, given each source's count `counts_S` so far."""
    keys, srcs = [], []
    for s, w in enumerate(w_S):
        m = int(np.ceil(n * w)) + 4  # more candidates than source s can take in n positions
        ks = np.arange(counts_S[s], counts_S[s] + m, dtype=np.float64)
        keys.append(_times(w, ks))
        srcs.append(np.full(m, s, dtype=np.int64))
    key, src = np.concatenate(keys), np.concatenate(srcs)
    order = np.lexsort((src, key))[:n]  # by time, ties to the lower source index
    chosen = src[order]
    taken = np.bincount(chosen, minlength=len(w_S))
    assert all(taken[s] < len(k) for s, k in enumerate(keys)), "blend candidate list exhausted"
    return chosen


class Blender:
    """Source ids of successive global positions, chunk after chunk (prefix-stable: `take(a)` then `take(b)`
    gives what `take(a + b)` gives).

    A two-way merge keeps each side within 1/2 of its share at every prefix; a flat merge of many sources does not
    (4 sources reach 1.5). So sources are the leaves of a balanced binary tree (index order halved recursively);
    every internal node merges its two children over the positions it receives. A leaf's error is 1/2 + r · (its
    parent's error), r = its share of the parent: 1/2 + r/2 < 1 at depth 2, so up to 4 sources stay within one
    sample whatever the weights (the tests check every prefix). Deeper trees (5+ sources) usually do, but it is not
    guaranteed (a Huffman-shaped tree is worse: a heavy leaf beside a tiny one inherits its parent's error).
    """

    def __init__(self, weights: Sequence[float]):
        w_S = normalise(weights)
        self.num_sources = len(w_S)
        self.children: List[tuple] = []  # internal node j: ((kind, id), (kind, id)), kind leaf | node
        self.child_w: List[np.ndarray] = []

        def build(sources: List[int]) -> tuple:
            if len(sources) == 1:
                return ("leaf", sources[0])
            half = (len(sources) + 1) // 2
            kids = (build(sources[:half]), build(sources[half:]))
            ws = np.array([w_S[sources[:half]].sum(), w_S[sources[half:]].sum()])
            self.children.append(kids)
            self.child_w.append(ws / ws.sum())
            return ("node", len(self.children) - 1)

        self.root = build(list(range(self.num_sources)))
        self.counts = [np.zeros(2, dtype=np.int64) for _ in self.children]

    def take(self, n: int) -> np.ndarray:
        """Source ids (int64 (n,)) of the next n positions."""
        return self._draw(self.root, n)

    def _draw(self, node: tuple, n: int) -> np.ndarray:
        kind, j = node
        if kind == "leaf":
            return np.full(n, j, dtype=np.int64)
        side = blend_chunk(self.child_w[j], self.counts[j], n)
        self.counts[j] += np.bincount(side, minlength=2)
        out = np.empty(n, dtype=np.int64)
        for c in (0, 1):
            where = side == c
            out[where] = self._draw(self.children[j][c], int(where.sum()))
        return out


def blend_source_ids(weights: Sequence[float], n: int, chunk: int = CHUNK) -> np.ndarray:
    """Source id of each of the first `n` global sample positions (int64 (n,)), built in chunks."""
    blender = Blender(weights)
    return np.concatenate([blender.take(min(chunk, n - a)) for a in range(0, n, chunk)] or
                          [np.zeros(0, dtype=np.int64)])


def epoch_permutation(seed: int, source: int, epoch: int, num_windows: int) -> np.ndarray:
    """The window order of `source` in `epoch` (int64 (num_windows,))."""
    return np.random.default_rng((seed, source, epoch)).permutation(num_windows).astype(np.int64)


def index_key(files: List[List[Path]], weights: Sequence[float], seq_len: int, seed: int, num_samples: int,
              val_fraction: float) -> str:
    """Hash of everything the index depends on (file stamps, not contents: a changed file gets a new index)."""
    stamps = [[(str(Path(p).resolve()), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in fs] for fs in files]
    spec = {"v": INDEX_VERSION, "files": stamps, "weights": [float(w) for w in weights], "seq_len": seq_len,
            "seed": seed, "n": num_samples, "val_fraction": val_fraction}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


class BlendIndex:
    """The memory-mapped index of one run: `source_ids` (uint8/uint16 (N,)), `window_ids` (int64 (N,)),
    `chunk_counts` (int64 (N // CHUNK + 1, S): each source's count before position c·CHUNK)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.source_ids = np.load(self.directory / "source_ids.npy", mmap_mode="r")
        self.window_ids = np.load(self.directory / "window_ids.npy", mmap_mode="r")
        self.chunk_counts = np.load(self.directory / "chunk_counts.npy", mmap_mode="r")
        self.meta = json.loads((self.directory / "meta.json").read_text())
        self.num_samples = len(self.source_ids)
        self.num_sources = self.chunk_counts.shape[1]

    def samples_per_source(self, stop: int) -> np.ndarray:
        """Samples each source contributed to positions [0, stop) (int64 (S,)): a stored chunk count plus one
        bincount of at most CHUNK positions."""
        c = min(stop // CHUNK, len(self.chunk_counts) - 1)
        rest = np.bincount(np.asarray(self.source_ids[c * CHUNK:stop]), minlength=self.num_sources)
        return np.asarray(self.chunk_counts[c]) + rest[:self.num_sources]


def _write_index(directory: Path, weights: Sequence[float], num_windows: List[int], num_samples: int,
                 seed: int, meta: dict) -> None:
    w_S = normalise(weights)
    S = len(w_S)
    src_dtype = np.uint8 if S <= 255 else np.uint16
    source_ids = np.lib.format.open_memmap(directory / "source_ids.npy", "w+", src_dtype, (num_samples,))
    window_ids = np.lib.format.open_memmap(directory / "window_ids.npy", "w+", np.int64, (num_samples,))
    counts_CS = np.zeros((num_samples // CHUNK + 1, S), dtype=np.int64)
    counts_S = np.zeros(S, dtype=np.int64)
    blender = Blender(weights)
    perms: Dict[int, tuple] = {}  # source -> (epoch, permutation): one epoch held per source
    for c, a in enumerate(range(0, num_samples, CHUNK)):
        counts_CS[c] = counts_S
        ids = blender.take(min(CHUNK, num_samples - a))
        source_ids[a:a + len(ids)] = ids
        win = np.empty(len(ids), dtype=np.int64)
        for s in range(S):
            where = np.flatnonzero(ids == s)
            if not len(where):
                continue
            W = num_windows[s]
            ks = counts_S[s] + np.arange(len(where), dtype=np.int64)
            epochs, offsets = np.divmod(ks, W)
            for e in range(int(epochs[0]), int(epochs[-1]) + 1):  # one pass per epoch, not per sample
                if perms.get(s, (None,))[0] != e:
                    perms[s] = (e, epoch_permutation(seed, s, e, W))
                sel = epochs == e
                win[where[sel]] = perms[s][1][offsets[sel]]
            counts_S[s] += len(where)
        window_ids[a:a + len(ids)] = win
    if num_samples % CHUNK == 0:
        counts_CS[-1] = counts_S
    source_ids.flush()
    window_ids.flush()
    del source_ids, window_ids
    np.save(directory / "chunk_counts.npy", counts_CS)
    (directory / "meta.json").write_text(json.dumps({**meta, "samples_per_source": counts_S.tolist()}, indent=1))


def build_blend_index(root: Path, key: str, weights: Sequence[float], num_windows: List[int], num_samples: int,
                      seed: int, meta: dict) -> Path:
    """The index directory `root/key`, written (into a temporary sibling, then renamed) if missing. Safe to call
    from several processes: the first rename wins."""
    final = Path(root) / key
    if (final / "meta.json").is_file():
        return final
    return publish_dir(final, lambda tmp: _write_index(tmp, weights, num_windows, num_samples, seed, meta),
                       marker="meta.json")
