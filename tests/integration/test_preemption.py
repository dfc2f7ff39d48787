"""SIGTERM (SLURM's preemption / time-limit signal) stops a running job after the current step with a complete
checkpoint and exit code 0 on every rank, and re-running the same command continues exactly. With torchrun the
signal reaches one worker only: the ranks agree through a collective, so all stop together."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.integration._runs import REPO, env_for, step_records

pytestmark = pytest.mark.slow

STEPS = 40
COMMON = ["model=tiny_mixtral", "data.max_corpus_mb=1", "data.tokenizer_vocab_size=512", "model.vocab_size=512",
          "trainer.seq_len=32", "trainer.global_batch_size=4", "trainer.micro_batch_size=2", "trainer.eval_every=0",
          f"trainer.save_every={STEPS}", f"trainer.max_steps={STEPS}", "logging.progress=false"]
EXACT_KEYS = ("loss", "lm_loss", "aux_loss", "grad_norm", "lr", "tokens")


def wait_for_step(run_dir, step: int, proc, timeout=240) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        if metrics.exists() and any(json.loads(l).get("step", 0) >= step for l in metrics.read_text().splitlines()):
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached")


def worker_pid(launcher_pid: int, rank: int) -> int:
    """PID of the torchrun worker with RANK=rank among the launcher's children."""
    import psutil

    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "train" in " ".join(child.cmdline()):
                return child.pid
        except psutil.Error:
            continue
    raise AssertionError(f"no worker with RANK={rank}")


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_saves_exits_0_and_the_rerun_continues_exactly(nproc, tmp_path, cache):
    full, run_dir = tmp_path / "full", tmp_path / "run"
    launch = ([sys.executable, "-m", "train"] if nproc == 1 else
              ["torchrun", "--standalone", f"--nproc_per_node={nproc}", "-m", "train", "parallel.ep_size=2"])
    def run_to_end(run_dir):
        return subprocess.run([*launch, *COMMON, f"trainer.run_dir={run_dir}"], cwd=REPO, env=env_for(cache),
                              check=True, capture_output=True, timeout=300)

    run_to_end(full)  # the uninterrupted reference
    proc = subprocess.Popen([*launch, *COMMON, f"trainer.run_dir={run_dir}"], cwd=REPO, env=env_for(cache),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(run_dir, 3, proc)
    os.kill(proc.pid if nproc == 1 else worker_pid(proc.pid, 1), signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    assert "stopping after step" in out
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    assert len(ckpts) == 1 and (ckpts[0] / "COMPLETE").is_file()
    stopped_at = int(ckpts[0].name.split("_")[1])
    assert 3 <= stopped_at < STEPS

    run_to_end(run_dir)
    got, ref = step_records(run_dir), step_records(full)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for r, r_ref in zip(got, ref):
        for key in EXACT_KEYS:
            assert r[key] == r_ref[key], (r["step"], key)
