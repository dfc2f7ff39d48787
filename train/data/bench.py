"""Loader benchmark (`scripts/bench_data.py`): a synthetic token corpus of `gb` GB, then

- `index_rss_bytes`: resident-memory growth of building its blend index (the index is written chunk by chunk
  into memory maps, so this stays bounded by a chunk, not by the number of samples);
- `first_batch_s_start` / `first_batch_s_late`: time from a fresh `DataModule` to the first batch at step 0 and
  at a step near the end of the index (the state is the step alone: both should cost the same);
- `tokens_per_s`: training tokens one rank reads per second at `seq_len`, the file in the page cache.
"""
from __future__ import annotations

import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

from train.config.run import DataConfig, TrainConfig, TrainerConfig
from train.data import build_data
from train.data.indexed import IndexedWriter
from train.data.tokenizer import open_tokenizer, save_atomic, train_byte_bpe

DOC_TOKENS = 2048  # mean synthetic document length


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; the peak from getrusage elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:  # pragma: no cover
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_corpus(prefix: Path, num_tokens: int, vocab: int, eos: int, seed: int = 0) -> None:
    """A Megatron pair of ~num_tokens random uint16 tokens in documents of random length ending with EOS, written
    in blocks (bounded memory)."""
    rng = np.random.default_rng(seed)
    writer = IndexedWriter(prefix, np.uint16)
    block = 1 << 22
    written = 0
    while written < num_tokens:
        n = min(block, num_tokens - written)
        tokens = rng.integers(1, vocab, n, dtype=np.uint16)
        cuts = np.sort(rng.choice(np.arange(1, n), size=max(n // DOC_TOKENS, 1), replace=False))
        cuts = np.append(cuts, n)
        tokens[cuts - 1] = eos
        for a, b in zip(np.concatenate([[0], cuts[:-1]]), cuts):
            writer.add_document(tokens[a:b])
        written += n
    writer.finalize()


def run(gb: float = 1.0, seq_len: int = 4096, global_batch_size: int = 64, micro_batch_size: int = 8,
        read_steps: int = 20, workdir: Optional[str] = None) -> dict:
    """The benchmark's figures (see the module docstring); the corpus lives in a temporary directory, deleted."""
    root = Path(tempfile.mkdtemp(prefix="bench_data-", dir=workdir))
    try:
        tok_dir = root / "tokenizer"
        save_atomic(train_byte_bpe(iter(["synthetic corpus for the loader benchmark"] * 20), 300), tok_dir)
        num_tokens = int(gb * 1e9) // 2  # uint16
        t0 = time.perf_counter()
        write_corpus(root / "synthetic", num_tokens, 300, eos=0)
        write_s = time.perf_counter() - t0
        windows = (num_tokens - 1) // seq_len
        max_steps = max(4 * windows // global_batch_size, read_steps + 2)  # ~4 epochs of samples
        cfg = TrainConfig(data=DataConfig(source="tokens", paths=[str(root / "synthetic")], tokenizer=str(tok_dir),
                                          cache_dir=str(root / "cache"), val_fraction=0.001),
                          trainer=TrainerConfig(global_batch_size=global_batch_size, micro_batch_size=micro_batch_size,
                                                seq_len=seq_len, max_steps=max_steps))
        cfg.model.vocab_size = 512
        open_tokenizer(tok_dir)  # imports and tokenizer files out of the measured growth
        rss0 = rss_bytes()
        t0 = time.perf_counter()
        dm = build_data(cfg)  # builds the index
        index_s = time.perf_counter() - t0
        index_rss = max(rss_bytes() - rss0, 0)
        dm.close()

        def first_batch(step: int) -> float:
            t = time.perf_counter()
            d = build_data(cfg)  # finds the cached index
            d.load_state_dict({**d.state_dict(), "step": step})
            d.next_global_batch_for_rank()
            d.samples_per_source()
            elapsed = time.perf_counter() - t
            d.close()
            return elapsed

        first_batch(0)  # warm the page cache and imports once
        start_s, late_s = first_batch(0), first_batch(max_steps - read_steps - 1)
        d = build_data(cfg)
        for s in range(read_steps):  # page cache warm-up of the rows read below
            d.global_batch_for_rank(s)
        t = time.perf_counter()
        for s in range(read_steps):
            d.global_batch_for_rank(s)
        read_s = time.perf_counter() - t
        d.close()
        return {"gb": gb, "num_tokens": num_tokens, "seq_len": seq_len, "num_samples": max_steps * global_batch_size,
                "write_corpus_s": round(write_s, 2), "index_build_s": round(index_s, 3),
                "tokens_per_s": read_steps * global_batch_size * seq_len / read_s,
                "first_batch_s_start": start_s, "first_batch_s_late": late_s, "index_rss_bytes": index_rss}
    finally:
        shutil.rmtree(root, ignore_errors=True)
