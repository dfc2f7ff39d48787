"""Preemption: SIGTERM (what SLURM sends before a preemption or at the time limit, and what `kill` sends) asks
the run to stop cleanly. The handler only raises a flag; after each step every rank learns, through one small
all-reduce, whether any rank got the signal, so all ranks finish the same step, save the same checkpoint and exit
together (a rank that stopped alone would leave the others waiting in a collective)."""
from __future__ import annotations

import signal

import torch

import parallel


class PreemptionGuard:
    """Context manager that turns SIGTERM into a flag for the duration of training (the previous handler is
    restored on exit). `requested(mesh)` is collective and returns the same answer on every rank."""

    def __init__(self, signals=(signal.SIGTERM,)):
        self.signals = signals
        self.received: int | None = None
        self._previous = {}

    def _handler(self, signum, frame) -> None:
        self.received = signum

    def __enter__(self) -> "PreemptionGuard":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def requested(self, mesh) -> bool:
        """Before: each rank may or may not have received a signal. After: True on every rank if any had."""
        flag = torch.tensor([0.0 if self.received is None else 1.0], device=mesh.device)
        return bool(parallel.all_reduce_stats(flag, mesh).item() > 0)
