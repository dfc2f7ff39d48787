"""Hang detection: `trainer.watchdog_s=N`. A rank whose training makes no progress for N seconds writes every
thread's stack to stderr (the job log), then to RUN_DIR/watchdog/rank_<r>.log, asks the other ranks to do the same,
and exits with `HANG_EXIT_CODE`, so the elastic launcher (launch/torchrun.sh) restarts every rank from the newest
complete checkpoint. A rank that cannot run its own watchdog (SIGSTOPped, a frozen node) is found by its peers:
they wait for it in a collective, stop making progress, and their watchdogs fire.

Progress is a finished optimizer step (`beat`). Phases that may legitimately take much longer than a step (the
first step of a start, which compiles and warms up; a checkpoint save; an evaluation) run under `slow(phase)` and
get `SLOW_PHASE_FACTOR` x N instead of N; collectives time out one N later still (`collective_timeout_s`, used by
parallel.init_distributed), so the watchdog, which dumps stacks, fires first even in a slow phase.

Two layers, the second for what the first cannot do:
- a Python thread checks the clock every `poll_s` (it runs while the main thread waits in a collective or in I/O,
  which release the GIL) and does the dump, the request to the peers and `os._exit`; every `PEER_POLL_S` it also
  checks a key of the job's TCPStore, and when another rank has reported a hang it dumps this rank's stacks and
  exits too, so the log holds every rank's view (a non-blocking check from this thread, which `__exit__` joins:
  a request still waiting when the store's host exits at the end of a job would abort the process);
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
PEER_POLL_S = 5  # how often each rank asks the store whether another rank reported a hang


def collective_timeout_s(watchdog_s: float) -> Optional[float]:
    """The collective timeout for `trainer.watchdog_s` (None: torch's default, when the watchdog is off): one
    `watchdog_s` beyond the longest allowance any watched phase gets, so a slow save or evaluation is never cut by
    a collective timeout, and a hang in one is reported by the watchdog (with stacks) first."""
    return (SLOW_PHASE_FACTOR + 1) * watchdog_s if watchdog_s > 0 else None


class Watchdog:
    """Context manager around training on one rank. `timeout_s` <= 0 makes every method a no-op.

    Before `__enter__` nothing runs; inside, the first step has the slow allowance, each `beat(step)` restarts the
    clock with `timeout_s`, and `slow(phase)` gives a block the slow allowance. `__exit__` stops the thread and the
    backstop."""

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
        self._store = None
        self._thread: Optional[threading.Thread] = None
        self._key: Optional[str] = None
        self._fired = False
        self._running = False

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    def __enter__(self) -> "Watchdog":
        if not self.enabled:
            return self
        self._running = True
        self._stop.clear()  # fit() may be entered again on the same trainer
        self._set("the first step", SLOW_PHASE_FACTOR * self.timeout_s)
        self._connect_store()
        self._thread = threading.Thread(target=self._watch, name="moeforge-watchdog", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if not self.enabled:
            return
        self._running = False
        self._stop.set()
        self._thread.join()  # no store request may be in flight once training is over
        self._store = None
        faulthandler.cancel_dump_traceback_later()

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
        try:
            faulthandler.dump_traceback_later(allowance + BACKSTOP_GRACE_S, exit=True, file=sys.__stderr__)
        except (AttributeError, ValueError, OSError):  # no real stderr (an embedding host): the thread still watches
            pass

    def _watch(self) -> None:
        next_peer_check = time.monotonic() + PEER_POLL_S
        while not self._stop.wait(self.poll_s):
            with self._lock:
                idle, allowance, phase = time.monotonic() - self._last, self._allowance, self._phase
            if idle > allowance:
                where = "" if self._step is None else f" after step {self._step}"
                self._fire(f"rank {self.rank} made no progress for {idle:.0f} s (in {phase}{where}; allowed "
                           f"{allowance:.0f} s, trainer.watchdog_s={self.timeout_s:g})", notify=True)
            if self._store is not None and time.monotonic() >= next_peer_check:
                next_peer_check = time.monotonic() + PEER_POLL_S
                reporter = self._peer_report()
                if reporter:
                    self._fire(f"rank {self.rank}: {reporter} reported a hang", notify=False)

    def _peer_report(self) -> Optional[str]:
        """Who reported a hang this round, if anyone (None also when the store does not answer: the hung rank
        may be its host)."""
        try:
            if self._store.check([self._key]):
                return self._store.get(self._key).decode()
        except Exception:
            return None
        return None

    def _fire(self, reason: str, notify: bool) -> None:
        """Dump every thread's stack (stderr, then this rank's log file), tell the peers, exit."""
        with self._lock:
            if self._fired or self._stop.is_set():
                return
            self._fired = True
        message = (f"moeforge: watchdog: {reason}: every thread's stack follows; exiting with code {HANG_EXIT_CODE} "
                   f"so the elastic launcher restarts the job from the newest complete checkpoint\n")
        stamped = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        self._dump(stamped, sys.stderr)  # first: the file system may be what hangs (the backstop ends that)
        if self.run_dir is not None:
            try:
                path = self.run_dir / "watchdog" / f"rank_{self.rank}.log"
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "a", encoding="utf-8") as log:
                    self._dump(stamped, log)
            except OSError:  # a full or read-only disk must not stop the exit
                pass
        if notify and self._store is not None:
            try:
                self._store.set(self._key, f"rank {self.rank} (step {self._step})")
            except Exception:  # the store's host may be the hung rank
                pass
        os._exit(HANG_EXIT_CODE)

    @staticmethod
    def _dump(message: str, out) -> None:
        try:
            out.write(message)
            out.flush()
            faulthandler.dump_traceback(file=out, all_threads=True)
            out.flush()
        except (OSError, ValueError):
            pass

    def _connect_store(self) -> None:
        """A client of the job's TCPStore (torchrun's MASTER_ADDR:MASTER_PORT) of our own, so our requests never
        queue behind the process group's. The key is per restart round. No store (one process): no peers."""
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if not addr or not port or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return
        import torch.distributed as dist

        try:
            self._store = dist.TCPStore(addr, int(port), is_master=False, timeout=timedelta(seconds=STORE_TIMEOUT_S),
                                        wait_for_workers=False)
        except Exception as e:  # hang detection still works on this rank; only the peers' dumps are lost
            print(f"moeforge: watchdog: rank {self.rank} cannot reach the store at {addr}:{port} ({e}); a hang will "
                  f"dump this rank's stacks only", file=sys.stderr)
            return
        run = os.environ.get("TORCHELASTIC_RUN_ID", "run")
        self._key = f"moeforge/watchdog/{run}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/hang"
