"""Data pipeline: documents (`corpus`), tokenizer (`tokenizer`), packed blocks (`packing`), and
world-size-independent batches (`loader`). `build_data` puts them together for one data-parallel rank."""
from __future__ import annotations

from typing import Callable, Optional

from train.config.run import TrainConfig, TrainerConfig
from train.data.corpus import Corpus, cache_root, load_corpus, split_train_val
from train.data.loader import DataModule, MapBlocks, StreamBlocks, StreamValBlocks
from train.data.packing import pack_dataset, pack_key, tokenizer_fingerprint
from train.data.tokenizer import EOS_TOKEN, PAD_TOKEN, ensure_tokenizer, load_tokenizer, open_tokenizer

# Streams keep this many validation global batches in memory (enough for `trainer.eval_batches`).
STREAM_VAL_GLOBAL_BATCHES = 16


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


def _build(cfg: TrainConfig, dp_rank: int, dp_size: int) -> DataModule:
    data, trainer = cfg.data, cfg.trainer
    corpus: Corpus = load_corpus(data)
    tokenizer_dir = ensure_tokenizer(data, corpus)
    tokenizer = open_tokenizer(tokenizer_dir)
    key = pack_key(corpus.fingerprint, tokenizer_fingerprint(tokenizer_dir), trainer.seq_len, data.val_fraction)
    if corpus.streaming:
        train_blocks = StreamBlocks(corpus.documents, tokenizer, trainer.seq_len, trainer.seed, data.val_fraction)
        val_blocks = StreamValBlocks(corpus.documents, tokenizer, trainer.seq_len, data.val_fraction,
                                     STREAM_VAL_GLOBAL_BATCHES * trainer.global_batch_size)
    else:
        train_docs, val_docs = split_train_val(corpus.documents, data.val_fraction)
        out = cache_root(data) / "packed" / key
        train_blocks = MapBlocks(pack_dataset(train_docs, tokenizer, trainer.seq_len, out / "train.arrow",
                                              data.num_proc), trainer.seed)
        val_blocks = (pack_dataset(val_docs, tokenizer, trainer.seq_len, out / "val.arrow", data.num_proc)
                      if len(val_docs) else None)
        if train_blocks.num_blocks < trainer.global_batch_size:
            raise ValueError(
                f"the corpus gives {train_blocks.num_blocks} training sequences of trainer.seq_len+1="
                f"{trainer.seq_len + 1} tokens, fewer than one global batch (trainer.global_batch_size="
                f"{trainer.global_batch_size}); use more data (data.max_corpus_mb, data.paths) or lower "
                "trainer.seq_len / trainer.global_batch_size")
    return DataModule(tokenizer=tokenizer, tokenizer_dir=tokenizer_dir, train_blocks=train_blocks,
                      val_blocks=val_blocks, seq_len=trainer.seq_len, global_batch_size=trainer.global_batch_size,
                      micro_batch_size=trainer.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                      seed=trainer.seed, data_key=key)


def build_data(cfg: TrainConfig, dp_rank: int = 0, dp_size: int = 1, is_main: bool = True,
               barrier: Optional[Callable[[], None]] = None) -> DataModule:
    """The `DataModule` of data-parallel rank `dp_rank` of `dp_size` (also carries `tokenizer`,
    `tokenizer_dir`, `vocab_size`). Distributed: pass `is_main` true on exactly one rank (per shared
    filesystem) and a `barrier` callable that every rank calls once; the main rank builds the tokenizer
    and packed caches before the barrier, the others load them after it. Without a barrier every process
    builds what is missing itself (cache writes are atomic, so this is safe, only redundant)."""
    check_batch_sizes(cfg.trainer, dp_size)
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} is not in [0, dp_size={dp_size})")
    if is_main or barrier is None:
        try:
            return _build(cfg, dp_rank, dp_size)
        finally:  # also on failure, so the other ranks fail with the same error instead of hanging
            if barrier is not None:
                barrier()
    barrier()
    return _build(cfg, dp_rank, dp_size)


__all__ = ["DataModule", "build_data", "check_batch_sizes", "load_tokenizer", "load_corpus", "ensure_tokenizer",
           "open_tokenizer", "EOS_TOKEN", "PAD_TOKEN"]
