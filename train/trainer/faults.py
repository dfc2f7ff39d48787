"""Deliberate faults for `scripts/chaos.py` and tests, switched on by environment variables only (no config field:
nothing a user sets by mistake). Off unless the variable is set.

- `MOEFORGE_INJECT_NAN_STEPS=7,8`: the loss of those optimizer steps (1-based, as logged) is multiplied by NaN on
  every rank, so each is a skipped step (`bad_step` event), as a batch of bad data would make it. The steps are
  fixed by number, so a resumed or restarted run skips the same ones, and so does an uninterrupted reference run.
"""
from __future__ import annotations

import os

NAN_STEPS_ENV = "MOEFORGE_INJECT_NAN_STEPS"


def nan_steps_from_env() -> frozenset[int]:
    """The steps `MOEFORGE_INJECT_NAN_STEPS` poisons (empty when unset); a malformed value is one clear error."""
    raw = os.environ.get(NAN_STEPS_ENV, "").strip()
    if not raw:
        return frozenset()
    try:
        steps = frozenset(int(s) for s in raw.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"{NAN_STEPS_ENV}={raw!r} must be comma-separated step numbers, e.g. 7,8") from None
    return steps
