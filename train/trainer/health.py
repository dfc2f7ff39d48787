"""Bad steps and loss spikes, watched from the step records (identical on every rank, so every rank decides the
same).

- A skipped step (non-finite global gradient norm, see `step.py`) is a `bad_step` event; `trainer.max_bad_steps`
  of them in a row stop the run (`TrainingStopped`) after a checkpoint of the last good weights.
- A loss more than `SPIKE_ZSCORE` standard deviations above the mean of the last `SPIKE_WINDOW` steps is a
  `spike` event: logged, not skipped (spikes are part of training; a skipped step loses data).
Events are lines of metrics.jsonl with an `event` key and no `loss` key, so step readers are not confused.
"""
from __future__ import annotations

import math
from collections import deque

SPIKE_WINDOW = 32  # recent finite losses the spike test compares with
SPIKE_MIN_HISTORY = 8  # no spike test before this many
SPIKE_ZSCORE = 6.0


class TrainingStopped(RuntimeError):
    """The run stopped itself (too many bad steps); the message says why and where its checkpoint is."""


class StepHealth:
    """Feed it every step record with `observe`; read `consecutive_bad` to decide whether to stop."""

    def __init__(self, max_bad_steps: int):
        self.max_bad_steps = max_bad_steps
        self.consecutive_bad = 0
        self.bad_steps: list[int] = []  # the current run of consecutive bad steps
        self._losses: deque = deque(maxlen=SPIKE_WINDOW)

    def observe(self, record: dict) -> list[dict]:
        """The events `record` raises (possibly none)."""
        events = []
        if record.get("skipped"):
            self.consecutive_bad += 1
            self.bad_steps.append(record["step"])
            events.append({"event": "bad_step", "step": record["step"], "grad_norm": record["grad_norm"],
                           "loss_value": record.get("loss"), "nonfinite_params": record.get("nonfinite_params", [])})
            return events
        self.consecutive_bad, self.bad_steps = 0, []
        loss = record.get("loss")
        if loss is None or not math.isfinite(loss):
            return events
        if len(self._losses) >= SPIKE_MIN_HISTORY:
            mean = sum(self._losses) / len(self._losses)
            std = math.sqrt(sum((x - mean) ** 2 for x in self._losses) / len(self._losses))
            if std > 0 and (loss - mean) / std >= SPIKE_ZSCORE:
                events.append({"event": "spike", "step": record["step"], "loss_value": loss,
                               "window_mean": mean, "window_std": std, "zscore": (loss - mean) / std})
        self._losses.append(loss)
        return events

    @property
    def should_stop(self) -> bool:
        return self.consecutive_bad >= self.max_bad_steps
