"""RunLogger sinks and the wandb mode fallback (no network, wandb never imported when disabled)."""
from __future__ import annotations

import json
import logging

from train.config import LoggingConfig
from train.trainer.logger import RunLogger, resolve_wandb_mode


def test_online_without_credentials_falls_back_to_offline(monkeypatch, tmp_path, caplog):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    with caplog.at_level(logging.WARNING, logger="train"):
        assert resolve_wandb_mode("online") == "offline"
    assert "WANDB_API_KEY" in caplog.text
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode("online") == "online"
    assert resolve_wandb_mode("disabled") == "disabled"


def test_jsonl_appends_and_plain_lines_every_log_every(tmp_path, caplog):
    cfg = LoggingConfig(wandb="disabled", log_every=2, progress=False)
    with caplog.at_level(logging.INFO, logger="train"):
        first = RunLogger(cfg, tmp_path, is_main=True, max_steps=4, start_step=0)
        for s in (1, 2, 3):
            first.log({"step": s, "loss": 1.0 / s})
        first.close()
        resumed = RunLogger(cfg, tmp_path, is_main=True, max_steps=4, start_step=3)
        resumed.log({"step": 4, "loss": 0.25})
        resumed.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    plain = [r.message for r in caplog.records if r.message.startswith("step ")]
    assert [m.split()[1] for m in plain] == ["1", "2", "4"]  # the first step, then every log_every


def test_non_main_rank_writes_nothing(tmp_path):
    logger = RunLogger(LoggingConfig(progress=False), tmp_path / "r1", is_main=False, max_steps=1, start_step=0)
    logger.log({"step": 1, "loss": 1.0})
    logger.close()
    assert not (tmp_path / "r1").exists()
