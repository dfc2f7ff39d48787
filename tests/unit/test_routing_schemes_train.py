"""Every routing scheme's tiny config trains: the loss falls over a short in-process run (2 layers, 6 steps).

Shares the small-run settings of test_trainer_run.py (a 1 MB corpus slice, a 512-token BPE built once here).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from parallel import Mesh
from train.config import load_train_config
from train.trainer.loop import Trainer
from train.trainer.validate import validate_config

SMALL = [
    "data.max_corpus_mb=1", "data.tokenizer_vocab_size=512", "data.val_fraction=0.05", "model.vocab_size=512",
    "model.num_layers=2", "trainer.seq_len=32", "trainer.global_batch_size=8", "trainer.micro_batch_size=8",
    "trainer.eval_every=0", "logging.progress=false", "logging.wandb=disabled", "optim.warmup_steps=2",
    "optim.lr=3e-3", "trainer.max_steps=6",
]
SCHEMES = ["tiny_noisy_topk", "tiny_switch", "tiny_gshard", "tiny_st_moe", "tiny_expert_choice", "tiny_base",
           "tiny_hash"]


@pytest.fixture(scope="module")
def cache_dir(small_cache):
    return small_cache  # the session's (tests/conftest.py)


@pytest.mark.parametrize("model", SCHEMES)
def test_tiny_scheme_loss_falls(model, tmp_path, cache_dir):
    cfg = load_train_config([f"model={model}", *SMALL, f"data.cache_dir={cache_dir}", f"trainer.run_dir={tmp_path}"])
    validate_config(cfg, world_size=1)
    torch.set_num_threads(1)
    trainer = Trainer(cfg, Mesh())
    trainer.fit()
    trainer.close()
    recs = [json.loads(line) for line in (Path(tmp_path) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["lm_loss"] for r in recs if "lm_loss" in r]
    assert len(losses) == 6
    assert losses[-1] < losses[0] - 0.3, losses
