"""The hang watchdog (train/trainer/watchdog.py) in one process: steps that keep finishing and a slow phase within
its longer allowance are left alone; a stall is reported with every thread's stack (stderr and the rank's log
file) and ends the process with HANG_EXIT_CODE. The multi-rank case (a SIGSTOPped peer) is in
tests/integration/test_chaos.py."""
from __future__ import annotations

import subprocess
import sys
import textwrap

from train.trainer.watchdog import HANG_EXIT_CODE, SLOW_PHASE_FACTOR, Watchdog, collective_timeout_s
from tests.integration._runs import REPO

SCRIPT = textwrap.dedent("""
    import sys, time
    from train.trainer.watchdog import Watchdog

    def stuck_in_a_collective():
        time.sleep(30)

    with Watchdog(0.5, rank=3, run_dir=sys.argv[1]) as watchdog:
        time.sleep(1.0)  # the first step (compile) has the slow allowance, 2 s
        for step in range(1, 11):  # steady steps: 0.1 s each, well within 0.5 s
            time.sleep(0.1)
            watchdog.beat(step)
        with watchdog.slow("a checkpoint save"):
            time.sleep(1.2)  # longer than 0.5 s, within 2 s
        print("survived the slow phase", flush=True)
        stuck_in_a_collective()
""")


def test_a_stalled_rank_dumps_every_stack_and_exits_but_a_slow_save_does_not(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == HANG_EXIT_CODE, proc.stderr[-3000:]  # the 30 s sleep ending would exit 0
    assert "survived the slow phase" in proc.stdout
    first = proc.stderr.splitlines()[0]
    assert "moeforge: watchdog: rank 3 made no progress for" in first and "after step 10" in first
    assert "trainer.watchdog_s=0.5" in first
    assert "in stuck_in_a_collective" in proc.stderr  # the main thread's stack
    assert "in _watch" in proc.stderr  # every thread, the watchdog's own included
    log = (tmp_path / "watchdog" / "rank_3.log").read_text()
    assert "made no progress" in log and "in stuck_in_a_collective" in log


def test_off_when_zero_and_collectives_get_the_longest_allowance():
    with Watchdog(0) as watchdog:  # no thread, no timer: a stall is not noticed
        watchdog.beat(1)
        with watchdog.slow("an evaluation"):
            pass
    assert collective_timeout_s(0) is None
    assert collective_timeout_s(600) == (SLOW_PHASE_FACTOR + 1) * 600  # after the slowest phase's watchdog
