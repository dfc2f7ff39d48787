"""SIGTERM to a whole job, as SLURM sends it on preemption or before the time limit (to every process of the
step: the batch shell, srun's task, torchrun's agent, the ranks): the ranks save a complete checkpoint, and
`launch/slurm.sbatch` (through `launch/torchrun.sh`) exits 0, though torchrun's agent itself exits 1 on the
signal. A SIGTERM before any save of this launch leaves the exit code non-zero: an older "stopped" status.json
does not count. `srun` and `scontrol` are stand-ins that run the one node's task here."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import psutil
import pytest

from parallel.ports import free_port
from tests.integration._runs import REPO, env_for
from tests.integration.test_preemption import COMMON, wait_for_step

pytestmark = pytest.mark.slow

FAKE_SRUN = """#!/usr/bin/env bash
while [[ "$1" == --* ]]; do shift; done  # srun's own options
SLURM_NODEID=0 exec "$@"
"""
FAKE_SCONTROL = "#!/usr/bin/env bash\necho 127.0.0.1\n"


def torchrun_started(pid: int) -> bool:
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "--rdzv-backend=c10d" in " ".join(child.cmdline()):
                return True
        except psutil.Error:  # a short-lived helper already gone
            continue
    return False


def start_job(run_dir, tmp_path, cache):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = env_for(cache)
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", SLURM_JOB_NODELIST="node0", SLURM_NNODES="1",
               SLURM_GPUS_ON_NODE="1", SLURM_SUBMIT_DIR=str(REPO), SLURM_JOB_ID=f"t{free_port()}",
               MASTER_PORT=str(free_port()))
    return subprocess.Popen(["bash", "launch/slurm.sbatch", *COMMON, f"trainer.run_dir={run_dir}"], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group, as a SLURM job step


def test_sigterm_to_the_whole_job_exits_0_after_a_complete_save(tmp_path, cache):
    run_dir = tmp_path / "run"
    job = start_job(run_dir, tmp_path, cache)
    wait_for_step(run_dir, 3, job)
    os.killpg(job.pid, signal.SIGTERM)
    out, _ = job.communicate(timeout=240)
    assert job.returncode == 0, out[-4000:]
    assert "SignalException" in out  # torchrun's agent did exit on the signal: the launcher turned it into 0
    assert "stopping after step" in out and "exiting 0" in out
    assert json.loads((run_dir / "status.json").read_text())["state"] == "stopped"
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    assert len(ckpts) == 1 and (ckpts[0] / "COMPLETE").is_file()

    job = start_job(run_dir, tmp_path, cache)  # the same command again, signalled before it can save
    deadline = time.time() + 60
    while not torchrun_started(job.pid):  # its ranks then take seconds to import before writing status.json
        assert job.poll() is None and time.time() < deadline
        time.sleep(0.05)
    assert json.loads((run_dir / "status.json").read_text())["state"] == "stopped"  # the earlier launch's
    os.killpg(job.pid, signal.SIGTERM)
    out, _ = job.communicate(timeout=240)
    assert job.returncode != 0, out[-4000:]
    assert "exiting 0" not in out
