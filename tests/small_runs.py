"""One-process training runs at tiny shapes on the built-in corpus, for tests that train, resume and compare runs.

`run(run_dir, cache_dir, *overrides)` trains (to `stop_at` if given) and returns the closed `Trainer`; `records`
reads its metrics.jsonl. One intra-op thread, so every run reduces in the same order and equal runs are equal.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from parallel import Mesh
from train.config import load_train_config
from train.trainer.loop import Trainer
from train.trainer.validate import validate_config

SMALL = [
    "data.max_corpus_mb=1", "data.tokenizer_vocab_size=512", "data.val_fraction=0.05", "model.vocab_size=512",
    "model.num_layers=2", "trainer.seq_len=32", "trainer.global_batch_size=8", "trainer.micro_batch_size=4",
    "trainer.eval_every=0", "logging.progress=false", "logging.wandb=disabled", "optim.warmup_steps=2",
]


def make_trainer(run_dir: Path, cache_dir: Path, *overrides: str) -> Trainer:
    cfg = load_train_config([*SMALL, f"data.cache_dir={cache_dir}", f"trainer.run_dir={run_dir}", *overrides])
    validate_config(cfg, world_size=1)
    torch.set_num_threads(1)  # same reduction order in every run
    return Trainer(cfg, Mesh())


def run(run_dir: Path, cache_dir: Path, *overrides: str, stop_at=None) -> Trainer:
    trainer = make_trainer(run_dir, cache_dir, *overrides)
    trainer.fit(stop_at=stop_at)
    trainer.close()
    return trainer


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
