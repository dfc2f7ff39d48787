"""`TrainState`: everything a run needs to continue exactly where it stopped.

The state splits in three because expert weights (and so their optimizer moments) may be sharded:
- `common_state_dict()` is identical on every rank: step, tokens seen, scheduler, data position, wandb run id
  and the parallel layout it was saved under. Rank 0 writes it as `train_state.pt`.
- `rank_state_dict()` is this rank's own RNG states. Each rank writes `train_state_rank{r}.pt`.
- the optimizer state (moments of what this rank holds, partitioned under ZeRO) belongs to `engine`, which
  writes its own files (`parallel/engine.py`).
Model weights are not here: they go to `model.safetensors` in logical (unsharded) form.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch


def capture_rng() -> dict:
    """The torch (CPU and CUDA), numpy and python RNG states of this process, as tensors and plain data only
    (numpy's key array becomes a tensor) so that the file loads with `torch.load(weights_only=True)`."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class TrainState:
    """Live training objects plus counters. `model` is the un-compiled module (stable state_dict keys); `engine`
    (a `parallel.TrainEngine`) owns backward, the optimizer and its state."""

    model: torch.nn.Module
    engine: Any
    scheduler: Any
    data: Any
    step: int = 0  # optimizer steps completed
    tokens: int = 0  # tokens consumed by training so far, over all ranks
    wandb_run_id: Optional[str] = None

    def common_state_dict(self, layout: dict) -> dict:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "scheduler": self.scheduler.state_dict(),
            "data": self.data.state_dict(),
            "wandb_run_id": self.wandb_run_id,
            "layout": layout,
        }

    def rank_state_dict(self) -> dict:
        return {"rng": capture_rng()}

    def load_common_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.tokens = int(state["tokens"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.data.load_state_dict(state["data"])
        self.wandb_run_id = state.get("wandb_run_id")

    def load_rank_state_dict(self, state: dict) -> None:
        restore_rng(state["rng"])
