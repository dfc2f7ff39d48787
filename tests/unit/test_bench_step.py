"""Smoke test of `scripts/bench_step.py`: a few tiny steps of ours and of transformers' Mixtral, in a subprocess
with its own cache (corpus slice, tokenizer, measured peak), so nothing is written to $HOME."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
TINY = ["data.max_corpus_mb=1", "data.tokenizer_vocab_size=512", "model.vocab_size=512", "model.num_layers=2",
        "data.val_fraction=0.05"]


def run_bench(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MOEFORGE_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_step.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def test_bench_step_reports_both_sides(tmp_path):
    proc = run_bench(tmp_path, "--steps", "2", "--warmup", "1", "--batch", "2", "--seq", "32", "model=tiny_mixtral",
                     *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("ours_tokens_per_s", "hf_tokens_per_s", "mfu", "hf_mfu", "peak_flops", "speedup", "tokens_per_step"):
        assert result[key] > 0, key
    assert result["model"] == "tiny_mixtral" and result["precision"] == "fp32" and result["tokens_per_step"] == 64
    assert result["first_step_agrees"], result  # same weights, same batch: the same cross-entropy
    assert (tmp_path / "cache" / "peak_flops.json").is_file()  # the measurement went to the test's cache


def test_bench_step_rejects_a_family_mixtral_cannot_express(tmp_path):
    proc = run_bench(tmp_path, "--steps", "1", "model=tiny_deepseek_v2")
    assert proc.returncode != 0
    assert "MixtralForCausalLM cannot express" in proc.stderr
