"""`build_data`: one data-parallel rank's `DataModule` from the config (tokenize if needed, check the files, build
the sample index), and `check_batch_sizes`."""
from __future__ import annotations

import logging
from typing import Callable, Optional

from train.config.run import TrainConfig, TrainerConfig
from train.data.blend import BlendIndex, build_blend_index, index_key
from train.data.corpus import cache_root
from train.data.loader import DataModule
from train.data.sources import data_key, file_stamps, open_sources, resolve_weights, source_specs
from train.data.tokenizer import tokenizer_info

log = logging.getLogger("train")


def check_batch_sizes(trainer: TrainerConfig, dp_size: int) -> int:
    """Gradient-accumulation steps G / (W·b); a clear error when they are not a whole number."""
    G, b, W = trainer.global_batch_size, trainer.micro_batch_size, dp_size
    if G <= 0 or b <= 0:
        raise ValueError(f"trainer.global_batch_size={G} and trainer.micro_batch_size={b} must be positive")
    if G % (W * b) == 0:
        return G // (W * b)
    hints = []
    if G % W == 0:
        divisors = [d for d in range(1, G // W + 1) if (G // W) % d == 0]
        hints.append(f"trainer.micro_batch_size in {divisors}")
    lower, upper = (G // (W * b)) * W * b, (G // (W * b) + 1) * W * b
    hints.append(f"trainer.global_batch_size={upper}" + (f" or {lower}" if lower > 0 else ""))
    raise ValueError(f"trainer.global_batch_size={G} must be divisible by data-parallel size x "
                     f"trainer.micro_batch_size = {W} x {b} = {W * b}; would divide: {', or '.join(hints)}")


def _build(cfg: TrainConfig, dp_rank: int, dp_size: int, is_main: bool) -> DataModule:
    data, trainer = cfg.data, cfg.trainer
    specs, tokenizer_dir = source_specs(data)
    tokenizer = tokenizer_info(tokenizer_dir)  # all training reads of it; no transformers import per rank
    sources = open_sources(specs, cfg, tokenizer, tokenizer_dir)
    weights = resolve_weights(data, [s.num_train_windows for s in sources])
    num_samples = trainer.max_steps * trainer.global_batch_size
    files = [[p for tf in s.files for p in tf.files()] for s in sources]
    key = index_key(files, weights, trainer.seq_len, trainer.seed, num_samples, data.val_fraction)
    meta = {"sources": [s.name for s in sources], "weights": weights, "num_samples": num_samples,
            "windows": [s.num_train_windows for s in sources]}
    directory = build_blend_index(cache_root(data) / "indices", key, weights, [s.num_train_windows for s in sources],
                                  num_samples, trainer.seed, meta)
    index = BlendIndex(directory)
    if is_main:
        for s, count in zip(sources, index.meta["samples_per_source"]):
            if count > s.num_train_windows:
                log.info(f"data: source {s.name} repeats: {count / s.num_train_windows:.1f} epochs of its "
                         f"{s.num_train_windows} training windows in {trainer.max_steps} steps")
            if s.num_val_windows == 0:
                log.info(f"data: source {s.name} has no validation window of {trainer.seq_len + 1} tokens in its "
                         f"last data.val_fraction={data.val_fraction}: val/{s.name}/loss is not logged")
    return DataModule(tokenizer=tokenizer, tokenizer_dir=tokenizer_dir, sources=sources, weights=weights,
                      index=index, seq_len=trainer.seq_len, global_batch_size=trainer.global_batch_size,
                      micro_batch_size=trainer.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                      seed=trainer.seed, data_key=data_key(files, weights, trainer, data.val_fraction),
                      files=file_stamps(files), document_mask=data.document_mask)


def build_data(cfg: TrainConfig, dp_rank: int = 0, dp_size: int = 1, is_main: bool = True,
               barrier: Optional[Callable[[], None]] = None) -> DataModule:
    """The `DataModule` of data-parallel rank `dp_rank` of `dp_size` (also carries `tokenizer`, a
    `TokenizerInfo`, `tokenizer_dir` and `vocab_size`). Distributed: pass `is_main` true on exactly one rank (per
    shared filesystem) and a `barrier` callable that every rank calls once; the main rank tokenizes (non-token
    sources), checks the files and writes the sample index before the barrier, the others memory-map them after it.
    Without a barrier every process builds what is missing itself (cache writes are atomic, so this is safe, only
    redundant)."""
    check_batch_sizes(cfg.trainer, dp_size)
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} is not in [0, dp_size={dp_size})")
    if is_main or barrier is None:
        try:
            return _build(cfg, dp_rank, dp_size, is_main)
        finally:  # also on failure, so the other ranks fail with the same error instead of hanging
            if barrier is not None:
                barrier()
    barrier()
    return _build(cfg, dp_rank, dp_size, is_main)

