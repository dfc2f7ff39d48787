"""World-size-independent batching of packed blocks.

The training order is one infinite sequence of block ids, fixed by the seed alone. Map-style data: the
concatenation of per-epoch permutations (epoch e: `numpy.random.default_rng(seed + e).permutation(N)`), so
batches span epoch boundaries seamlessly. Streams: the packed output of the document stream shuffled with a
seeded buffer (`IterableDataset.shuffle(seed, buffer)`, `set_epoch(e)` each pass).

Global batch s is positions [s·G, (s+1)·G) of that sequence (G = global_batch_size). Data-parallel rank r of W
holds positions [s·G + r·G/W, s·G + (r+1)·G/W): its contiguous slice, cut into micro-batches of b rows
(accumulation steps G/(W·b)). So the union over ranks of step s is exactly the single-rank step s for any W,
and the only state is s (global batches consumed).
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import datasets
import numpy as np
import torch

from train.data.corpus import is_val_text, iter_texts
from train.data.packing import stream_blocks

SHUFFLE_BUFFER_DOCS = 10_000  # streaming: documents in the seeded shuffle buffer
MicroBatch = Dict[str, torch.Tensor]


class MapBlocks:
    """Random access into packed blocks in the seeded epoch-permutation order."""

    def __init__(self, blocks: datasets.Dataset, seed: int):
        self.blocks, self.seed, self.num_blocks = blocks, seed, len(blocks)
        self._perms: Dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 4:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng(self.seed + epoch).permutation(self.num_blocks)
        return self._perms[epoch]

    def block_ids(self, start: int, stop: int) -> np.ndarray:
        """Block ids at global positions [start, stop) of the training order."""
        pos = np.arange(start, stop)
        epochs, offsets = np.divmod(pos, self.num_blocks)
        return np.array([self._perm(int(e))[o] for e, o in zip(epochs, offsets)], dtype=np.int64)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """(stop - start, seq_len + 1) token ids at positions [start, stop)."""
        return np.asarray(self.blocks[self.block_ids(start, stop).tolist()]["input_ids"], dtype=np.int64)


class StreamBlocks:
    """Sequential reading of blocks packed on the fly from a shuffled document stream. Reading a position
    behind the cursor restarts the stream from the beginning and skips forward (resume costs re-packing)."""

    def __init__(self, docs: datasets.IterableDataset, tokenizer, seq_len: int, seed: int, val_fraction: float):
        self.docs, self.tokenizer, self.seq_len = docs, tokenizer, seq_len
        self.seed, self.val_fraction = seed, val_fraction
        self.num_blocks = None  # unknown for a stream
        self._restart()

    def _train_texts(self) -> Iterator[str]:
        for epoch in itertools.count():
            shuffled = self.docs.shuffle(seed=self.seed, buffer_size=SHUFFLE_BUFFER_DOCS)
            shuffled.set_epoch(epoch)
            num_texts = 0
            for text in iter_texts(shuffled, batch_size=64):
                if not is_val_text(text, self.val_fraction):
                    num_texts += 1
                    yield text
            if num_texts == 0:
                raise ValueError("streaming corpus has no training documents (all held out or empty)")

    def _restart(self) -> None:
        self._it = stream_blocks(self._train_texts(), self.tokenizer, self.seq_len)
        self._cursor = 0

    def rows(self, start: int, stop: int) -> np.ndarray:
        if start < self._cursor:
            self._restart()
        for _ in range(start - self._cursor):
            next(self._it)
        out = np.stack([next(self._it) for _ in range(stop - start)])
        self._cursor = stop
        return out


def _to_micro_batches(rows: np.ndarray, micro_batch_size: int) -> List[MicroBatch]:
    tensor = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))
    return [{"input_ids": tensor[i:i + micro_batch_size, :-1].contiguous(),
             "labels": tensor[i:i + micro_batch_size, 1:].contiguous()}
            for i in range(0, tensor.shape[0], micro_batch_size)]


class DataModule:
    """Training and validation batches for one data-parallel rank.

    Each rank holds the same tokenizer and the same (seeded) order; it reads only its slice of each global
    batch. `step` = global batches consumed; it is the whole loader state (`state_dict`).
    """

    def __init__(self, *, tokenizer, tokenizer_dir: Path, train_blocks, val_blocks, seq_len: int,
                 global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int,
                 data_key: str):
        self.tokenizer, self.tokenizer_dir = tokenizer, Path(tokenizer_dir)
        self.vocab_size = len(tokenizer)
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id
        self.train_blocks, self.val_blocks = train_blocks, val_blocks
        self.seq_len, self.seed, self.data_key = seq_len, seed, data_key
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.grad_accum_steps = global_batch_size // (dp_size * micro_batch_size)
        self.step = 0

    @property
    def num_train_blocks(self) -> Optional[int]:
        """Training sequences per epoch (None for a stream)."""
        return self.train_blocks.num_blocks

    @property
    def num_val_blocks(self) -> int:
        return len(self.val_blocks) if self.val_blocks is not None else 0

    # --- training ---
    def global_batch_for_rank(self, step: int, dp_rank: Optional[int] = None,
                              dp_size: Optional[int] = None) -> List[MicroBatch]:
        """Micro-batches (each `input_ids`, `labels`: int64 (b, seq_len)) that rank `dp_rank` of `dp_size`
        (default: this rank) reads at global batch `step`. Does not move `self.step`."""
        rank = self.dp_rank if dp_rank is None else dp_rank
        world = self.dp_size if dp_size is None else dp_size
        per_rank = self.global_batch_size // world
        start = step * self.global_batch_size + rank * per_rank
        return _to_micro_batches(self.train_blocks.rows(start, start + per_rank), self.micro_batch_size)

    def next_global_batch_for_rank(self) -> List[MicroBatch]:
        """This rank's micro-batches of global batch `self.step`, then `self.step += 1`."""
        batch = self.global_batch_for_rank(self.step)
        self.step += 1
        return batch

    def train_batches(self, start_step: Optional[int] = None) -> Iterator[List[MicroBatch]]:
        """Endless iterator of this rank's micro-batch lists, one per optimizer step, from `start_step`
        (default: the current position). `self.step` already counts a batch when it is yielded, so a
        checkpoint taken after processing it resumes at the next one."""
        if start_step is not None:
            self.step = start_step
        while True:
            yield self.next_global_batch_for_rank()

    # --- validation ---
    def val_batches(self, num_batches: int) -> Iterator[MicroBatch]:
        """This rank's micro-batches of `num_batches` validation global batches: fixed, in order, the same
        blocks every call (held-out documents, unshuffled; wraps around a small val set). Over all ranks
        the same sequences are evaluated whatever the world size."""
        if self.num_val_blocks == 0:
            raise ValueError("no validation data: raise data.val_fraction (or use a larger corpus)")
        per_rank = self.global_batch_size // self.dp_size
        for k in range(num_batches):
            start = k * self.global_batch_size + self.dp_rank * per_rank
            ids = [(start + i) % self.num_val_blocks for i in range(per_rank)]
            rows = self.val_blocks[ids]
            rows = rows["input_ids"] if isinstance(rows, dict) else rows
            yield from _to_micro_batches(np.asarray(rows), self.micro_batch_size)

    # --- state ---
    def state_dict(self) -> dict:
        """The position (global batches consumed) plus what a resume must agree on."""
        return {"step": self.step, "sequences_consumed": self.step * self.global_batch_size,
                "seed": self.seed, "global_batch_size": self.global_batch_size, "seq_len": self.seq_len,
                "num_train_blocks": self.num_train_blocks, "data_key": self.data_key}

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state["step"]`. The world size and micro-batch size may differ from the saving run;
        the seed, global batch, sequence length and data may not (a clear error says which differs)."""
        for key, name in (("seed", "trainer.seed"), ("global_batch_size", "trainer.global_batch_size"),
                          ("seq_len", "trainer.seq_len"), ("num_train_blocks", "the training data"),
                          ("data_key", "the training data")):
            if key in state and state[key] != self.state_dict()[key]:
                raise ValueError(f"cannot resume the data position: {name} differs from the checkpoint "
                                 f"({key}: checkpoint {state[key]!r}, now {self.state_dict()[key]!r})")
        self.step = int(state["step"])


class StreamValBlocks:
    """The first blocks packed from the held-out documents of a stream (unshuffled), kept in memory."""

    def __init__(self, docs: datasets.IterableDataset, tokenizer, seq_len: int, val_fraction: float,
                 max_blocks: int):
        texts = (t for t in iter_texts(docs, batch_size=64) if is_val_text(t, val_fraction))
        blocks = list(itertools.islice(stream_blocks(texts, tokenizer, seq_len), max_blocks))
        self._rows = np.stack(blocks) if blocks else np.zeros((0, seq_len + 1), dtype=np.int64)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, ids):
        return self._rows[ids]
