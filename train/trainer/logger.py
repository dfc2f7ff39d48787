"""Where step records go: `RUN_DIR/metrics.jsonl`, Weights & Biases, a progress bar and plain log lines.

Only rank 0 logs. The jsonl file is opened in append mode, so a resumed run continues the same file (after a
crash, steps between the last checkpoint and the crash appear twice; readers keep the last record of a step,
as `scripts/plot_run.py` does). wandb is imported only when enabled, and never touches the network unless
`logging.wandb=online` and an API key is available.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import uuid
from pathlib import Path
from typing import Optional

from train.config import LoggingConfig

log = logging.getLogger("train")

# Fields shown in the plain log line and the progress bar, in this order.
_LINE_KEYS = ("loss", "lm_loss", "aux_loss", "mtp_loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "mfu")


def resolve_wandb_mode(requested: str) -> str:
    """`online` without credentials falls back to `offline` (with a warning) instead of failing or prompting."""
    if requested not in ("disabled", "offline", "online"):
        raise ValueError(f"logging.wandb={requested!r}: choose disabled, offline or online")
    if requested == "online" and not _have_wandb_credentials():
        log.warning("logging.wandb=online but no WANDB_API_KEY (or ~/.netrc entry): logging offline instead; "
                    "upload later with `wandb sync`")
        return "offline"
    return requested


def _have_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


class RunLogger:
    """Rank 0's sink for step records. Other ranks get an instance that does nothing."""

    def __init__(self, cfg: LoggingConfig, run_dir: Path, is_main: bool, max_steps: int, start_step: int,
                 run_config: Optional[dict] = None, wandb_run_id: Optional[str] = None):
        self.cfg, self.is_main, self.run_dir = cfg, is_main, Path(run_dir)
        self.wandb_run = None
        self.wandb_run_id = wandb_run_id
        self.metrics_file = None
        self.bar = None
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_file = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        mode = resolve_wandb_mode(cfg.wandb)
        if mode != "disabled":
            self._init_wandb(mode, run_config)
        if cfg.progress and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def _init_wandb(self, mode: str, run_config: Optional[dict]) -> None:
        os.environ["WANDB_DIR"] = str(self.run_dir)
        import wandb

        if self.wandb_run_id is None:
            self.wandb_run_id = uuid.uuid4().hex[:12]
        self.wandb_run = wandb.init(project=self.cfg.project, entity=self.cfg.entity, dir=str(self.run_dir),
                                    mode=mode, id=self.wandb_run_id, resume="allow", config=run_config)

    def log(self, record: dict) -> None:
        """Write one step's record (a flat dict with an int `step`) to every enabled sink."""
        if not self.is_main:
            return
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()
        step = record["step"]
        if self.wandb_run is not None:
            scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            self.wandb_run.log(scalars, step=step)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=_fmt(record.get("loss")), tok_s=_fmt(record.get("tokens_per_s")))
        if step % self.cfg.log_every == 0 or step == 1:
            self.info(f"step {step} " + " ".join(f"{k}={_fmt(record[k])}" for k in _LINE_KEYS if k in record))

    def event(self, event: dict) -> None:
        """Write one event line (`{"event": name, "step": ..., ...}`) to metrics.jsonl and the log."""
        if not self.is_main:
            return
        self.metrics_file.write(json.dumps(event) + "\n")
        self.metrics_file.flush()
        self.info(f"{event['event']} at step {event['step']}: "
                  + " ".join(f"{k}={v}" for k, v in event.items() if k not in ("event", "step")))

    def info(self, message: str) -> None:
        """A plain line for batch-system logs (written above the progress bar when there is one)."""
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(message)
            log.debug(message)
        else:
            log.info(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
        if self.metrics_file is not None:
            self.metrics_file.close()
