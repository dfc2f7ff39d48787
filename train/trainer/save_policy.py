"""What a run does after a checkpoint save fails: `trainer.on_save_error` and `trainer.max_save_failures`.

The save itself (train/checkpoint/save_resume.py) already left nothing behind and raised the same `SaveError` on
every rank, carrying the newest complete checkpoint; so every rank takes the same decision here, without another
collective. Continuing costs at most the steps since that checkpoint if the run dies before a later save succeeds;
a full disk that stays full stops the run after `max_save_failures` saves in a row.
"""
from __future__ import annotations

from train.checkpoint.save_errors import SaveError
from train.config.choices import OnSaveError


class SavePolicy:
    """Counts failed saves in a row and decides: return (keep training) or raise the `SaveError` (stop)."""

    def __init__(self, on_save_error, max_save_failures: int):
        self.mode = OnSaveError(str(on_save_error))
        self.max_failures = max_save_failures
        self.failures_in_a_row = 0

    def succeeded(self) -> None:
        self.failures_in_a_row = 0

    def failed(self, error: SaveError, last: bool) -> str:
        """After a failed save: raise `error` (with why the run stops) or return the line to log. `last`: the
        final or preemption save, which no later save would retry, so it always stops."""
        self.failures_in_a_row += 1
        why = None
        if last:
            why = "it was the run's last save"
        elif self.mode == OnSaveError.stop:
            why = "trainer.on_save_error=stop"
        elif self.mode == OnSaveError.auto and error.previous is None:
            why = "trainer.on_save_error=auto and there is no earlier checkpoint to fall back on"
        elif self.failures_in_a_row >= self.max_failures:
            why = f"{self.failures_in_a_row} saves in a row failed (trainer.max_save_failures={self.max_failures})"
        if why is not None:
            raise SaveError(f"{error}. Stopped: {why}; free space (or fix the file system), then re-run the same "
                            f"command to resume", error.previous) from None
        return (f"{error}. Training continues (trainer.on_save_error={self.mode.value}, failure "
                f"{self.failures_in_a_row} of {self.max_failures} in a row); the next save retries")
