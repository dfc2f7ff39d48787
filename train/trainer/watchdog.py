"""Hang detection: `trainer.watchdog_s=N`. A rank whose training makes no progress for N seconds writes every
thread's stack to stderr (the job log) and to RUN_DIR/watchdog/rank_<r>.log, asks the other ranks to do the same,
and exits with `HANG_EXIT_CODE`, so the elastic launcher (launch/torchrun.sh) restarts every rank from the newest
complete checkpoint. A rank that cannot run its own watchdog (SIGSTOPped, a frozen node) is found by its peers:
they wait for it in a collective, stop making progress, and their watchdogs fire.

Progress is a finished optimizer step (`beat`). Phases that may legitimately take much longer than a step (the
first step of a start, which compiles and warms up; a checkpoint save; an evaluation) run under `slow(phase)` and
get `SLOW_PHASE_FACTOR` x N instead of N; collectives time out after the same longer allowance
(`collective_timeout_s`, used by parallel.init_distributed), so the watchdog, which dumps stacks, fires first.

Three layers, each for what the one before cannot do:
- a Python thread checks the clock every `poll_s` (it runs while the main thread waits in a collective or in I/O,
  which release the GIL) and does the dump, the request to the peers and `os._exit`;
- a second thread waits on a key of the run's TCPStore (one blocking request, no polling load on the store): when
  another rank reports a hang it dumps this rank's stacks and exits too, so the log holds every rank's view;
- `faulthandler.dump_traceback_later` is re-armed at each beat with `BACKSTOP_GRACE_S` more: a C thread that dumps
  and exits even when the main thread holds the GIL and the Python thread cannot run.
"""
from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Optional

SLOW_PHASE_FACTOR = 4  # first step (compile), save, evaluation: this many times trainer.watchdog_s
BACKSTOP_GRACE_S = 30  # the C-level backstop fires this long after the Python watchdog should have
HANG_EXIT_CODE = 124  # as coreutils `timeout`: the rank was stopped for taking too long
STORE_TIMEOUT_S = 5  # a request to the store (its host may be the hung rank) waits at most this long


def collective_timeout_s(watchdog_s: float) -> Optional[float]:
    """The collective timeout for `trainer.watchdog_s` (None: torch's default, when the watchdog is off): the
    longest allowance any watched phase gets, so a slow save or evaluation is never cut by a collective timeout."""
    return SLOW_PHASE_FACTOR * watchdog_s if watchdog_s > 0 else None


class Watchdog:
    """Context manager around training on one rank. `timeout_s` <= 0 makes every method a no-op.

    Before `__enter__` nothing runs; inside, the first step has the slow allowance, each `beat(step)` restarts the
    clock with `timeout_s`, and `slow(phase)` gives a block the slow allowance. `__exit__` stops both threads."""

    def __init__(self, timeout_s: float, rank: int = 0, run_dir: Optional[Path] = None):
        self.timeout_s = float(timeout_s)
        self.rank = rank
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.poll_s = min(1.0, self.timeout_s / 10) if self.timeout_s > 0 else 1.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._last = time.monotonic()
        self._allowance = self.timeout_s
        self._phase = "the first step"
        self._step: Optional[int] = None
        self._log = None
        self._store = None  # for set(): the listener's client is blocked in wait() (one request at a time each)
        self._listener = None
        self._key: Optional[str] = None
        self._fired = False
        self._running = False

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    def __enter__(self) -> "Watchdog":
        if not self.enabled:
            return self
        if self.run_dir is not None:  # opened now: at hang time the file system may be what hangs
            path = self.run_dir / "watchdog" / f"rank_{self.rank}.log"
            path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(path, "a", encoding="utf-8")
        self._running = True
        self._set("the first step", SLOW_PHASE_FACTOR * self.timeout_s)
        self._connect_store()
        threading.Thread(target=self._watch, name="moeforge-watchdog", daemon=True).start()
        if self._listener is not None:
            threading.Thread(target=self._listen, name="moeforge-watchdog-peers", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        if not self.enabled:
            return
        self._running = False
        self._stop.set()
        faulthandler.cancel_dump_traceback_later()
        if self._log is not None:
            self._log.close()
            self._log = None

    def beat(self, step: int) -> None:
        """Step `step` finished: the next one has `timeout_s`."""
        self._step = step
        self._set("the next step", self.timeout_s)

    @contextlib.contextmanager
    def slow(self, phase: str):
        """Run a block that may take `SLOW_PHASE_FACTOR` x `timeout_s` (a save, an evaluation)."""
        previous = (self._phase, self._allowance)
        self._set(phase, SLOW_PHASE_FACTOR * self.timeout_s)
        try:
            yield
        finally:
            self._set(*previous)  # the clock restarts: the slow phase was progress

    def _set(self, phase: str, allowance: float) -> None:
        if not self._running:  # a save outside fit() (tests, tools) is not watched
            return
        with self._lock:
            self._phase, self._allowance, self._last = phase, allowance, time.monotonic()
        faulthandler.dump_traceback_later(allowance + BACKSTOP_GRACE_S, exit=True)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            with self._lock:
                idle, allowance, phase = time.monotonic() - self._last, self._allowance, self._phase
            if idle > allowance:
                where = "" if self._step is None else f" after step {self._step}"
                self._fire(f"rank {self.rank} made no progress for {idle:.0f} s (in {phase}{where}; allowed "
                           f"{allowance:.0f} s, trainer.watchdog_s={self.timeout_s:g})", notify=True)

    def _listen(self) -> None:
        """Block on the store until another rank reports a hang (or the store goes away at the end of the job)."""
        try:
            self._listener.wait([self._key], timedelta(days=365))
        except Exception:  # the store's host exited (a normal end) or is gone: nothing to report
            return
        # (the value names the reporter, but its host may exit the moment it reads it: not asked for again)
        self._fire(f"rank {self.rank}: another rank reported a hang (its own report names it)", notify=False)

    def _fire(self, reason: str, notify: bool) -> None:
        """Dump every thread's stack (stderr, then this rank's log file), tell the peers, exit."""
        with self._lock:
            if self._fired or self._stop.is_set():
                return
            self._fired = True
        message = (f"moeforge: watchdog: {reason}: every thread's stack follows; exiting with code {HANG_EXIT_CODE} "
                   f"so the elastic launcher restarts the job from the newest complete checkpoint\n")
        for out in (sys.stderr, self._log):
            if out is None:
                continue
            try:
                out.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}")
                out.flush()
                faulthandler.dump_traceback(file=out, all_threads=True)
                out.flush()
            except (OSError, ValueError):  # a full or read-only disk must not stop the exit
                pass
        if notify and self._store is not None:
            try:
                self._store.set(self._key, f"rank {self.rank} (step {self._step})")
            except Exception:  # the store's host may be the hung rank
                pass
        os._exit(HANG_EXIT_CODE)

    def _connect_store(self) -> None:
        """Two clients of the job's TCPStore (torchrun's MASTER_ADDR:MASTER_PORT) of our own: a client serves one
        request at a time, so the listener's blocking wait must hold up neither the process group's requests nor
        this rank's own report. The key is per restart round. No store (one process): no peers."""
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if not addr or not port or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return
        import torch.distributed as dist

        try:
            self._store, self._listener = (
                dist.TCPStore(addr, int(port), is_master=False, timeout=timedelta(seconds=STORE_TIMEOUT_S),
                              wait_for_workers=False) for _ in range(2))
        except Exception as e:  # hang detection still works on this rank; only the peers' dumps are lost
            print(f"moeforge: watchdog: rank {self.rank} cannot reach the store at {addr}:{port} ({e}); a hang will "
                  f"dump this rank's stacks only", file=sys.stderr)
            return
        run = os.environ.get("TORCHELASTIC_RUN_ID", "run")
        self._key = f"moeforge/watchdog/{run}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/hang"
