"""`python -m train` end to end in a subprocess: a few real steps on the embedded corpus, then the files a
user relies on (metrics.jsonl with the contract's keys, the resolved config, a complete checkpoint, plots)."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.integration._runs import REPO, env_for, read_metrics, train_cli
from tests.unit.test_checkpoint_safe_load import plant_payload
from train.checkpoint.checksums import write_checksums

FAST = ["data.max_corpus_mb=1", "data.tokenizer_vocab_size=512", "model.vocab_size=512", "trainer.seq_len=64",
        "trainer.global_batch_size=8", "trainer.micro_batch_size=4", "logging.wandb=disabled"]
CONTRACT_KEYS = ("step", "loss", "lm_loss", "aux_loss", "tokens", "tokens_per_s", "mfu", "lr", "grad_norm",
                 "moe/devices_per_token_max", "moe/devices_per_token_mean", "moe/a2a_tokens_sent",
                 "moe/dropped_frac")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.mark.slow
def test_train_tiny_mixtral_cli(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    train_cli(["model=tiny_mixtral", "trainer.max_steps=5", f"trainer.run_dir={run_dir}",
               f"data.cache_dir={cache_dir}", "trainer.save_every=3", "trainer.eval_every=5",
               "data.val_fraction=0.05", *FAST], cache_dir)
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    for r in records:
        for key in CONTRACT_KEYS:
            assert key in r, key
        assert "mtp_loss" not in r
    assert records[-1]["tokens"] == 5 * 8 * 64
    assert "val_loss" in records[-1]
    assert len(records[-1]["moe/layer0/tokens_per_expert"]) == 8
    assert (run_dir / "config.yaml").is_file()
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["step_00000003", "step_00000005"]
    assert (run_dir / "checkpoints" / "step_00000005" / "COMPLETE").is_file()

    # Resume with a longer budget: the same file continues and the checkpoint at step 5 is kept as is.
    train_cli(["model=tiny_mixtral", "trainer.max_steps=6", f"trainer.run_dir={run_dir}",
               f"data.cache_dir={cache_dir}", "trainer.save_every=3", "trainer.eval_every=0",
               "data.val_fraction=0.05", *FAST], cache_dir)
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5, 6]

    subprocess.run([sys.executable, "scripts/plot_run.py", str(run_dir)], cwd=REPO, env=env_for(cache_dir),
                   check=True, capture_output=True)
    assert (run_dir / "plots" / "loss.png").is_file()
    assert (run_dir / "plots" / "expert_load_layer0.png").is_file()

    # A tampered copy: a pickle payload planted in the newest checkpoint, its checksums rewritten to match (an
    # attacker can do both), is refused by the loader, one line, and never runs.
    tampered, marker = tmp_path / "tampered", tmp_path / "pwned"
    shutil.copytree(run_dir, tampered)
    newest = tampered / "checkpoints" / "step_00000006"
    plant_payload(newest / "train_state.pt", marker)
    write_checksums(newest, skip=("COMPLETE",))
    proc = subprocess.run([sys.executable, "-m", "train", "model=tiny_mixtral", "trainer.max_steps=7",
                           f"trainer.run_dir={tampered}", f"data.cache_dir={cache_dir}", "data.val_fraction=0.05",
                           *FAST],
                          cwd=REPO, env=env_for(cache_dir), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "train_state.pt was refused" in proc.stderr.strip().splitlines()[-1]
    assert not marker.exists()


@pytest.mark.slow
def test_train_tiny_deepseek_v3_cli_logs_mtp(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    train_cli(["model=tiny_deepseek_v3", "trainer.max_steps=2", f"trainer.run_dir={run_dir}",
               f"data.cache_dir={cache_dir}", "trainer.eval_every=0", *FAST], cache_dir)
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2]
    assert all("mtp_loss" in r and "moe/layer1/bias_absmean" in r for r in records)


@pytest.mark.parametrize("override,field", [("model.moe.top_k=9", "model.moe.top_k=9"),
                                            ("precision.recipe=rowwise", "precision.recipe=rowwise"),
                                            ("parallel.zero_stage=2", "parallel.zero_stage=2 partitions"),
                                            ("trainer.init_from=/nope", "trainer.init_from")])
def test_invalid_config_fails_fast_with_the_field_name(tmp_path, cache_dir, override, field):
    proc = subprocess.run([sys.executable, "-m", "train", override, f"trainer.run_dir={tmp_path}/r"],
                          cwd=REPO, env=env_for(cache_dir), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith(f"moeforge: {field}")  # one line, no traceback
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_no_secret_or_environment_reaches_the_run_dir(tmp_path, cache_dir):
    """API keys and the environment stay out of every file a run writes (config, logs, metrics, checkpoints,
    wandb's offline files), whatever the environment holds."""
    run_dir = tmp_path / "run"
    env = env_for(cache_dir)
    env.update(WANDB_API_KEY="sentinel0key0" + "0" * 27, HF_TOKEN="hf_sentinel1token", MOEFORGE_PROBE="sentinel2env")
    subprocess.run([sys.executable, "-m", "train", "model=tiny_mixtral", "trainer.max_steps=2",
                    "logging.wandb=offline", f"trainer.run_dir={run_dir}", f"data.cache_dir={cache_dir}",
                    *[o for o in FAST if not o.startswith("logging.wandb")]],
                   cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".distcp" for p in files) and (run_dir / "wandb").is_dir()
    leaked = [str(p) for p in files if b"sentinel" in p.read_bytes()]
    assert not leaked, leaked
