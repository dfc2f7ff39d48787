"""`precision=fp8` trains tiny_deepseek_v3 through the command line with every recipe: the run log names the
recipe and kernels, and the loss follows bf16's (fp8 builds on it) closely without being bf16's."""
from __future__ import annotations

import pytest

from tests.integration._runs import read_metrics, train_cli, train_here

STEPS = 8
RUN = ["model=tiny_deepseek_v3", f"trainer.max_steps={STEPS}", "trainer.eval_every=0", "trainer.save_every=100",
       "data.max_corpus_mb=1", "data.tokenizer_vocab_size=512", "model.vocab_size=512", "trainer.seq_len=64",
       "trainer.global_batch_size=4", "trainer.micro_batch_size=4", "optim.warmup_steps=2", "logging.wandb=disabled"]


@pytest.fixture(scope="module")
def bf16_losses(tmp_path_factory, cache):
    run_dir = tmp_path_factory.mktemp("bf16")
    train_here([*RUN, "precision=bf16", f"trainer.run_dir={run_dir}"], cache)  # the reference, in this process
    return [r["loss"] for r in read_metrics(run_dir)]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "blockwise"])
def test_fp8_recipe_trains_close_to_bf16(recipe, tmp_path, cache, bf16_losses):
    proc = train_cli([*RUN, "precision=fp8", f"precision.recipe={recipe}", f"trainer.run_dir={tmp_path}"], cache)
    log = proc.stdout + proc.stderr
    kernel = "emulated blockwise linear" if recipe == "blockwise" else "torchao Float8Linear"
    assert f"fp8 recipe={recipe}: 32 linears -> {kernel}" in log
    assert f"3 expert stacks -> emulated {recipe} grouped gemm" in log
    assert "output head (lm_head)" in log and "router (layers.1.ffn.router.gate" in log
    losses = [r["loss"] for r in read_metrics(tmp_path)]
    assert len(losses) == STEPS
    assert losses[-1] < losses[0] - 0.5  # it trains
    assert losses != bf16_losses
    assert losses[-1] == pytest.approx(bf16_losses[-1], rel=0.03)
