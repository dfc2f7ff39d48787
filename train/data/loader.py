"""World-size-independent batches read through the blended sample index.

The training order is the index (`blend.py`): global sample position p reads window `window_ids[p]` of source
`source_ids[p]`. Global batch s is positions [s·G, (s+1)·G) (G = global_batch_size); data-parallel rank r of W
holds positions [s·G + r·G/W, s·G + (r+1)·G/W), cut into micro-batches of b rows (accumulation steps G/(W·b)). So
the union over ranks of step s is exactly the single-rank step s for any W, and the only state is s (global batches
consumed): resuming reads the index at s·G, whatever s is. Each rank reads only its own rows, through memory maps.

While a step runs, a background thread reads this rank's next global batch (`next_global_batch_for_rank`);
`last_wait_s` is how long the caller waited for it.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

from train.data.blend import BlendIndex
from train.data.token_source import TokenSource

MicroBatch = Dict[str, torch.Tensor]


def read_rows(sources: Sequence[TokenSource], source_ids: np.ndarray, window_ids: np.ndarray,
              document_mask: bool, val: bool = False) -> Dict[str, np.ndarray]:
    """`rows` (n, L + 1) int64 windows (and `document_ids` (n, L) int32 when `document_mask`) of the given
    (source, window) pairs, in order."""
    n, L = len(source_ids), sources[0].seq_len
    rows = np.empty((n, L + 1), dtype=np.int64)
    docs = np.empty((n, L), dtype=np.int32) if document_mask else None
    for s in np.unique(source_ids):
        where = np.flatnonzero(source_ids == s)
        rows[where] = sources[int(s)].windows(window_ids[where], val)
        if docs is not None:
            docs[where] = sources[int(s)].document_ids(window_ids[where], val)
    out = {"rows": rows}
    if docs is not None:
        out["document_ids"] = docs
    return out


def to_micro_batches(read: Dict[str, np.ndarray], micro_batch_size: int) -> List[MicroBatch]:
    """Split rows into micro-batches: `input_ids`, `labels` int64 (b, L), and `document_ids` if read."""
    tensor = torch.from_numpy(read["rows"])
    docs = torch.from_numpy(read["document_ids"]) if "document_ids" in read else None
    out = []
    for i in range(0, tensor.shape[0], micro_batch_size):
        mb = {"input_ids": tensor[i:i + micro_batch_size, :-1].contiguous(),
              "labels": tensor[i:i + micro_batch_size, 1:].contiguous()}
        if docs is not None:
            mb["document_ids"] = docs[i:i + micro_batch_size].contiguous()
        out.append(mb)
    return out


class DataModule:
    """Training and validation batches for one data-parallel rank.

    Every rank holds the same tokenizer, sources and (memory-mapped) index; it reads only its slice of each global
    batch. `step` = global batches consumed; it is the whole loader state (`state_dict`).
    """

    def __init__(self, *, tokenizer, tokenizer_dir: Path, sources: Sequence[TokenSource], weights: Sequence[float],
                 index: BlendIndex, seq_len: int, global_batch_size: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, seed: int, data_key: str, files: Dict[str, list], document_mask: bool = False):
        self.tokenizer, self.tokenizer_dir = tokenizer, Path(tokenizer_dir)
        self.vocab_size = len(tokenizer)
        self.eos_token_id, self.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.sources, self.weights, self.index = list(sources), list(weights), index
        self.source_names = [s.name for s in self.sources]
        self.seq_len, self.seed, self.data_key, self.files = seq_len, seed, data_key, files
        self.document_mask = document_mask
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.grad_accum_steps = global_batch_size // (dp_size * micro_batch_size)
        self.step = 0
        self.last_wait_s = 0.0
        self._pool: Optional[ThreadPoolExecutor] = None
        self._ahead: Optional[tuple] = None  # (step, Future) of the batch being read in the background
        self._counts: Optional[tuple] = None  # (step, samples per source after it)

    @property
    def num_train_blocks(self) -> int:
        """Training windows per pass over all sources."""
        return sum(s.num_train_windows for s in self.sources)

    @property
    def num_val_blocks(self) -> int:
        return sum(s.num_val_windows for s in self.sources)

    # --- training ---
    def global_batch_for_rank(self, step: int, dp_rank: Optional[int] = None,
                              dp_size: Optional[int] = None) -> List[MicroBatch]:
        """Micro-batches (each `input_ids`, `labels`: int64 (b, seq_len), plus `document_ids` int32 (b, seq_len)
        with `data.document_mask`) that rank `dp_rank` of `dp_size` (default: this rank) reads at global batch
        `step`. Does not move `self.step`."""
        rank = self.dp_rank if dp_rank is None else dp_rank
        world = self.dp_size if dp_size is None else dp_size
        per_rank = self.global_batch_size // world
        start = step * self.global_batch_size + rank * per_rank
        stop = start + per_rank
        if stop > self.index.num_samples:
            raise ValueError(f"global batch {step} is past the sample index ({self.index.num_samples} samples = "
                             f"trainer.max_steps x trainer.global_batch_size); raise trainer.max_steps")
        read = read_rows(self.sources, np.asarray(self.index.source_ids[start:stop]),
                         np.asarray(self.index.window_ids[start:stop]), self.document_mask)
        return to_micro_batches(read, self.micro_batch_size)

    def next_global_batch_for_rank(self) -> List[MicroBatch]:
        """This rank's micro-batches of global batch `self.step`, then `self.step += 1`; the next batch is read
        in the background meanwhile. `last_wait_s`: seconds spent waiting here for the data."""
        t0 = time.perf_counter()
        if self._ahead is not None and self._ahead[0] == self.step:
            batch = self._ahead[1].result()
        else:
            batch = self.global_batch_for_rank(self.step)
        self.last_wait_s = time.perf_counter() - t0
        self.step += 1
        self._ahead = None
        if (self.step + 1) * self.global_batch_size <= self.index.num_samples:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
            future: Future = self._pool.submit(self.global_batch_for_rank, self.step)
            self._ahead = (self.step, future)
        return batch

    def train_batches(self, start_step: Optional[int] = None) -> Iterator[List[MicroBatch]]:
        """Endless iterator of this rank's micro-batch lists, one per optimizer step, from `start_step`
        (default: the current position). `self.step` already counts a batch when it is yielded."""
        if start_step is not None:
            self.step = start_step
        while True:
            yield self.next_global_batch_for_rank()

    def samples_per_source(self, step: Optional[int] = None) -> Dict[str, int]:
        """Samples each source contributed to the first `step` (default: `self.step`) global batches, all ranks
        together (from the index: the same on every rank). Incremental from one step to the next."""
        step = self.step if step is None else step
        G = self.global_batch_size
        if self._counts is not None and self._counts[0] == step - 1:
            ids = np.asarray(self.index.source_ids[(step - 1) * G:step * G])
            counts = self._counts[1] + np.bincount(ids, minlength=len(self.sources))[:len(self.sources)]
        elif self._counts is not None and self._counts[0] == step:
            counts = self._counts[1]
        else:
            counts = self.index.samples_per_source(step * G)
        self._counts = (step, counts)
        return {name: int(c) for name, c in zip(self.source_names, counts)}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._ahead = None

    # --- validation ---
    def val_batches(self, source: int, num_batches: int) -> Iterator[MicroBatch]:
        """This rank's micro-batches of `num_batches` validation global batches of source `source`: its held-out
        windows in order, the same every call (wrapping around a small region). Over all ranks the same windows
        are evaluated whatever the world size."""
        src = self.sources[source]
        if src.num_val_windows == 0:
            raise ValueError(f"source {src.name} has no validation window: raise data.val_fraction")
        per_rank = self.global_batch_size // self.dp_size
        for k in range(num_batches):
            start = k * self.global_batch_size + self.dp_rank * per_rank
            ids = np.arange(start, start + per_rank, dtype=np.int64) % src.num_val_windows
            read = read_rows([src], np.zeros(per_rank, dtype=np.int64), ids, self.document_mask, val=True)
            yield from to_micro_batches(read, self.micro_batch_size)

    # --- state ---
    def state_dict(self) -> dict:
        """The position (global batches consumed) plus what a resume must agree on."""
        return {"step": self.step, "sequences_consumed": self.step * self.global_batch_size,
                "seed": self.seed, "global_batch_size": self.global_batch_size, "seq_len": self.seq_len,
                "data_key": self.data_key, "files": self.files}

    def check_resumable(self, state: dict) -> None:
        """Raise a one-line `ValueError` when the checkpoint's data position cannot be continued here: another
        seed, global batch, sequence length, or changed data (naming the first file that changed)."""
        mine = self.state_dict()
        for key, name in (("seed", "trainer.seed"), ("global_batch_size", "trainer.global_batch_size"),
                          ("seq_len", "trainer.seq_len")):
            if key in state and state[key] != mine[key]:
                raise ValueError(f"cannot resume the data position: {name} differs from the checkpoint "
                                 f"({key}: checkpoint {state[key]!r}, now {mine[key]!r})")
        if "data_key" in state and state["data_key"] != self.data_key:
            old = state.get("files") or {}
            for path, stamp in self.files.items():
                if path in old and list(old[path]) != list(stamp):
                    raise ValueError(f"{path}: changed since the checkpoint was written (size, mtime_ns "
                                     f"{list(old[path])} -> {list(stamp)}); restore the file or train in a new run "
                                     "dir")
            raise ValueError(f"cannot resume the data position: the training data differs from the checkpoint "
                             f"(data.paths / data.weights / data.val_fraction; files now {sorted(self.files)}, "
                             f"then {sorted(old)}); use the same data or a new run dir")

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state["step"]`. The world size and micro-batch size may differ from the saving run; the
        seed, global batch, sequence length and data may not (a clear error says which differs)."""
        self.check_resumable(state)
        self.close()
        self.step = int(state["step"])
