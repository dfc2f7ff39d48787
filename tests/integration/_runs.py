"""Helpers for integration tests: run the real CLI in subprocesses and read what it wrote."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = str(Path(sys.executable).parent)

# Small, fast settings shared by integration runs: a 1 MB slice of the embedded corpus and a 2048-token BPE.
FAST_DATA = ["data.max_corpus_mb=1", "data.tokenizer_vocab_size=2048", "model.vocab_size=2048"]


def env_for(cache_dir: Path) -> Dict[str, str]:
    env = dict(os.environ)
    env["MOEFORGE_CACHE"] = str(cache_dir)
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    env["WANDB_MODE"] = "disabled"
    env["OMP_NUM_THREADS"] = "1"
    env.pop("WANDB_API_KEY", None)
    return env


def run_cli(args: Sequence[str], cache_dir: Path, timeout: int = 300, check: bool = True
            ) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), cwd=REPO, env=env_for(cache_dir), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def train_cli(overrides: Sequence[str], cache_dir: Path, timeout: int = 300, check: bool = True
              ) -> subprocess.CompletedProcess:
    return run_cli([sys.executable, "-m", "train", *overrides], cache_dir, timeout, check)


def train_here(overrides: Sequence[str], cache_dir: Path) -> None:
    """Train one process in this process, through the trainer `python -m train` runs: the same overrides composed
    and validated, the cache of `env_for`, its one intra-op thread. For the one-process references a multi-rank
    command is compared with, and runs that only set a test up: each saves an interpreter start (~4 s, which one
    process cannot spread over cores). What a test checks of the command line itself stays a subprocess."""
    import torch

    from parallel import Mesh
    from train.config import load_train_config
    from train.trainer.loop import Trainer
    from train.trainer.validate import validate_config

    if not any(o.startswith("data.cache_dir=") for o in overrides):
        overrides = [*overrides, f"data.cache_dir={cache_dir}"]
    cfg = load_train_config(list(overrides))
    validate_config(cfg, world_size=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = Trainer(cfg, Mesh())
        try:
            trainer.fit()
        finally:
            trainer.close()
    finally:
        torch.set_num_threads(threads)


def torchrun_cli(nproc: int, overrides: Sequence[str], cache_dir: Path, timeout: int = 300) -> str:
    """`torchrun --standalone --nproc_per_node=nproc -m train ...` (gloo ranks on CPU); returns its output."""
    proc = run_cli(["torchrun", "--standalone", f"--nproc_per_node={nproc}", "-m", "train", *overrides], cache_dir,
                   timeout)
    return proc.stdout + proc.stderr


def read_metrics(run_dir: Path) -> List[dict]:
    with open(Path(run_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def step_records(run_dir: Path) -> List[dict]:
    """One record per optimizer step (validation or other extra records are skipped)."""
    return [r for r in read_metrics(run_dir) if "loss" in r and "step" in r]
