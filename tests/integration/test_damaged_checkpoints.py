"""Damaged checkpoints through the CLI: `trainer.resume=auto` skips a newest checkpoint whose files no longer match
their checksums (truncated weights, a flipped byte in optimizer state), says so, resumes from the previous
complete one and then follows the uninterrupted run exactly; `trainer.keep_last` deletes older checkpoints only
once a newer one is complete."""
from __future__ import annotations

import shutil

import pytest

from tests.integration._runs import step_records, train_cli

pytestmark = pytest.mark.slow

COMMON = ["model=tiny_mixtral", "data.max_corpus_mb=1", "data.tokenizer_vocab_size=512", "model.vocab_size=512",
          "trainer.seq_len=32", "trainer.global_batch_size=4", "trainer.micro_batch_size=2", "trainer.eval_every=0",
          "trainer.save_every=2", "logging.progress=false"]
EXACT_KEYS = ("loss", "lm_loss", "aux_loss", "grad_norm", "lr", "tokens")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache):
    """A run stopped at step 4 (checkpoints 2 and 4) and the uninterrupted 6-step run."""
    root = tmp_path_factory.mktemp("runs")
    train_cli([*COMMON, "trainer.max_steps=4", f"trainer.run_dir={root / 'stopped'}"], cache)
    train_cli([*COMMON, "trainer.max_steps=6", f"trainer.run_dir={root / 'full'}"], cache)
    return root / "stopped", step_records(root / "full")


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,file,reason", [
    (truncate, "state/__0_0.distcp", "truncated"),
    (flip_a_byte, "state/.metadata", "corrupted"),
])
def test_resume_skips_a_damaged_newest_checkpoint(runs, cache, tmp_path, damage, file, reason):
    stopped, full = runs
    run_dir = tmp_path / "run"
    shutil.copytree(stopped, run_dir)
    damage(run_dir / "checkpoints" / "step_00000004" / file)
    proc = train_cli([*COMMON, "trainer.max_steps=6", f"trainer.run_dir={run_dir}"], cache)
    log = proc.stdout + proc.stderr
    assert f"step_00000004/{file}" in log and reason in log
    assert "resuming from" in log and "step_00000002" in log
    assert (run_dir / "checkpoints" / "step_00000004").is_dir()  # reported, never deleted
    got = {r["step"]: r for r in step_records(run_dir)}  # steps 3-4 were re-run and logged again
    for step in (5, 6):
        for key in EXACT_KEYS:
            assert got[step][key] == full[step - 1][key], (step, key)


def test_keep_last_deletes_only_older_complete_checkpoints(cache, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / ".tmp_step_00000001").mkdir(parents=True)  # an interrupted save: left alone
    train_cli([*COMMON, "trainer.max_steps=6", "trainer.keep_last=2", f"trainer.run_dir={run_dir}"], cache)
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith("."))
    assert kept == ["step_00000004", "step_00000006"]
    assert any(p.name.startswith(".stale_") or p.name.startswith(".tmp_") for p in (run_dir / "checkpoints").iterdir())
