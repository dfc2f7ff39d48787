"""Config fuzz: random combinations of model, MoE, parallel and precision overrides over the tiny configs.

Each combination is either refused by the dry run's checks (a `ConfigError`, one line naming the field) or passes
them, and then the dry run (run record, model built on the meta device, memory plan) must not fail; a sample of the
accepted single-rank ones trains one real CPU step. No combination may pass validation and then fail in a model
constructor: the constructors call the same `validate()` methods as the schema.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from train.config import CONFIG_DIR, compose
from train.trainer.dry_run import dry_run
from train.trainer.validate import ConfigError, typed_config, validate_config

NUM_COMBINATIONS = 240
NUM_STEPPED = 8
TINY = sorted(p.stem for p in (Path(CONFIG_DIR) / "model").glob("tiny_*.yaml"))
GROUPS = ("model.", "parallel.", "precision.", "trainer.", "data.", "optim.", "logging.")
SPACE = {
    "model.moe.router": ["topk", "noisy_topk", "switch", "gshard", "expert_choice", "base", "hash"],
    "model.moe.scoring": ["softmax_topk", "topk_softmax", "sigmoid"],
    "model.moe.top_k": [1, 2, 3, 4, 8, 9],
    "model.moe.num_experts": [1, 2, 4, 6, 8, 16],
    "model.moe.granularity": [1, 2, 3, 4],
    "model.moe.num_shared_experts": [0, 1, 2],
    "model.moe.capacity_factor": ["null", 0.3, 1.0, 1.25, 2.0],
    "model.moe.device_capacity_factor": ["null", 1.0, 0.2],
    "model.moe.device_limit": ["null", 1, 2, 4],
    "model.moe.routing_groups": ["null", 1, 2, 4, 3],
    "model.moe.norm_topk_prob": ["true", "false"],
    "model.moe.expert_input_scaling": ["true", "false"],
    "model.moe.num_groups": [1, 2, 4],
    "model.moe.topk_groups": [1, 2],
    "model.moe.group_score": ["max", "top2_sum"],
    "model.moe.bias_update_rate": [0.0, 0.001],
    "model.moe.expert_balance_coef": [0.0, 0.01],
    "model.moe.z_loss_coef": [0.0, 0.001],
    "model.moe.jitter_eps": [0.0, 0.01],
    "model.moe.load_coef": [0.0, 0.01],
    "model.moe.layer_freq": [1, 2],
    "model.moe.layer_offset": [0, 1, 2],
    "model.mtp_depth": [0, 1],
    "model.attention.num_kv_heads": [1, 2, 3, 4],
    "parallel.ep_size": [1, 1, 2, 4, 3],
    "parallel.zero_stage": [0, 0, 1, 2, 3],
    "parallel.a2a_dtype": ["auto", "fp8"],
    "trainer.activation_checkpointing": ["none", "full", "selective"],
}
PRECISIONS = {"fp32": ["precision.name=fp32"], "bf16": ["precision.name=bf16"],
              "bf16_autocast": ["precision.name=bf16_autocast"],
              "fp8": ["precision.name=fp8", "precision.recipe=tensorwise"]}


@pytest.fixture(scope="module")
def token_data(tmp_path_factory):
    """A tiny Megatron token file and the tokenizer it names (as tests/unit/test_data_tokens.py writes them)."""
    from train.data.indexed import write_indexed
    from tests.token_data import random_docs, tiny_tokenizer

    root = tmp_path_factory.mktemp("fuzz")
    tok = root / "tokenizer"
    tiny_tokenizer(tok)
    rng = np.random.default_rng(0)
    docs = random_docs(rng, 200)
    prefix = write_indexed(root / "corpus", docs, np.uint16)
    return root, str(prefix).removesuffix(".bin").removesuffix(".idx"), str(tok)


@pytest.fixture(scope="module")
def bases(token_data):
    """Each tiny model composed once (composition is the slow part), with tiny shapes and token data."""
    root, prefix, tok = token_data
    common = ["data=tokens", f"data.paths=[{prefix}]", f"data.tokenizer={tok}", f"data.cache_dir={root / 'cache'}",
              "data.val_fraction=0.1", "trainer.seq_len=16", "trainer.micro_batch_size=1",
              "trainer.global_batch_size=8", "trainer.resume=never", "trainer.eval_every=0", "model.vocab_size=512"]
    return {name: compose([f"model={name}", *common]) for name in TINY}


def combinations(seed: int = 17):
    rng = random.Random(seed)
    for _ in range(NUM_COMBINATIONS):
        model, precision = rng.choice(TINY), rng.choice(sorted(PRECISIONS))
        keys = rng.sample(sorted(SPACE), rng.randint(1, 6))
        overrides = [f"{k}={rng.choice(SPACE[k])}" for k in keys]
        yield model, rng.choice([1, 1, 2, 4, 8]), [*PRECISIONS[precision], *overrides]


def _typed(bases, model, overrides):
    return typed_config(OmegaConf.merge(bases[model], OmegaConf.from_dotlist(overrides)))


def test_every_combination_is_refused_naming_a_field_or_builds_and_plans(bases, tmp_path, one_thread):
    refused, accepted, steppable = [], [], []
    for model, world, overrides in combinations():
        cfg = _typed(bases, model, overrides)
        try:
            validate_config(cfg, world)
        except ConfigError as e:
            msg = str(e)
            assert "\n" not in msg and any(g in msg for g in GROUPS), (model, world, overrides, msg)
            refused.append(msg)
            continue
        # validation passed: the rest of the dry run (run record, meta-device model, memory plan) may not fail
        result = dry_run(cfg, world)
        assert result["dry_run"] == "ok" and result["total_params"] > 0, (model, world, overrides)
        accepted.append((model, world, overrides))
        if world == 1 and cfg.parallel.ep_size == 1 and cfg.parallel.zero_stage == 0:
            steppable.append((model, overrides))
    stepped = _train_one_step_each(bases, steppable[:NUM_STEPPED], tmp_path)
    print(f"config fuzz: {len(refused)} refused, {len(accepted)} accepted, {stepped} stepped")
    assert len(refused) + len(accepted) == NUM_COMBINATIONS >= 200
    assert len(refused) >= 20 and len(accepted) >= 20 and stepped >= min(NUM_STEPPED, len(steppable))


def _train_one_step_each(bases, sample, tmp_path) -> int:
    """One real CPU optimizer step for each sampled accepted combination (one rank, tiny shapes)."""
    from parallel import Mesh
    from train.trainer.loop import Trainer

    for i, (model, overrides) in enumerate(sample):
        run_dir = tmp_path / f"step{i}"
        cfg = _typed(bases, model, [*overrides, "trainer.max_steps=1", "trainer.global_batch_size=2",
                                    "trainer.save_every=1000", f"trainer.run_dir={run_dir}", "logging.progress=false"])
        trainer = Trainer(cfg, Mesh())
        try:
            trainer.fit()
        finally:
            trainer.close()
        record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        assert record["step"] == 1 and np.isfinite(record["loss"]), (model, overrides, record)
    return len(sample)


def test_dry_run_command_checks_and_writes_nothing(tmp_path, token_data):
    """`python -m train ... trainer.dry_run=true`: a summary and one JSON line, exit 0, no run dir; a refusal is
    one line naming the field, exit non-zero, before any tokenizer or data work."""
    import os
    import subprocess
    import sys

    _, prefix, tok = token_data
    env = {**os.environ, "PYTHONPATH": str(Path(CONFIG_DIR).parent), "TMPDIR": str(tmp_path / "tmp")}
    base = [sys.executable, "-m", "train", "model=tiny_deepseek_v2", "data=tokens", f"data.paths=[{prefix}]",
            f"data.tokenizer={tok}", "model.vocab_size=512", f"trainer.run_dir={tmp_path / 'run'}",
            "trainer.dry_run=true"]
    ok = subprocess.run(base, capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    result = json.loads(ok.stdout.strip().splitlines()[-1])
    assert result["dry_run"] == "ok" and result["data"] == [{"source": "corpus", "files": 1}]
    assert not (tmp_path / "run").exists()
    bad = subprocess.run([*base, "model.moe.router=switch", "model.moe.top_k=1", "model.moe.norm_topk_prob=true",
                          "model.moe.num_groups=1", "model.moe.topk_groups=1"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines() == [
        "moeforge: model.moe.router=switch gates with the chosen probability, not renormalised: set "
        "model.moe.norm_topk_prob=false"]
    assert not (tmp_path / "run").exists()
