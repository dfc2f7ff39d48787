"""Saves that fail part-way: a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored, so a write raises EFBIG or torch's
writer fails) hit in the middle of a checkpoint. The earlier checkpoint stays intact and is the one a resume takes,
the message names the file, no partial directory is left, `keep_last` deletes nothing while saves fail, and the run
continues or stops as `trainer.on_save_error` says.

The limit applies to the whole process, so the runs happen in one child process (tiny shapes, ~3 s of CPU)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from parallel import Mesh
from train.checkpoint.save_errors import SaveError
from train.checkpoint.save_resume import find_resume_checkpoint
from train.config import load_train_config
from train.trainer.save_policy import SavePolicy

REPO = Path(__file__).resolve().parents[2]

# Steps 1-2 save normally; steps 3-4 run under a 200 kB file-size limit (the sharded state file is ~20 MB, every
# other file of a checkpoint and the metrics file stay under it), so the step-4 save fails in DCP's write.
CHILD = r"""
import json, logging, resource, signal, sys
from pathlib import Path
from tests.small_runs import make_trainer
from train.checkpoint.save_errors import SaveError

logging.basicConfig(level=logging.INFO)  # the trainer's lines, to stderr
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit raises EFBIG instead of killing us
root, cache = Path(sys.argv[1]), Path(sys.argv[2])
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
out = {}
for mode in ("continue", "stop"):
    run_dir = root / mode
    t = make_trainer(run_dir, cache, "trainer.max_steps=6", "trainer.save_every=2", "trainer.keep_last=1",
                     f"trainer.on_save_error={mode}")
    t.fit(stop_at=2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))
    error = None
    try:
        t.fit(stop_at=4)
    except SaveError as e:
        error = str(e)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    entry = {"error": error, "step": t.state.step,
             "after_failure": sorted(p.name for p in (run_dir / "checkpoints").iterdir())}
    if mode == "continue":  # the disk has room again: the next save succeeds, and only then keep_last prunes
        t.fit()
        entry["final"] = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    t.close()
    entry["events"] = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"event"' in l]
    out[mode] = entry
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def failed_saves(tmp_path_factory):
    root = tmp_path_factory.mktemp("saves")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(root), str(root / "cache")], cwd=REPO, text=True,
                          capture_output=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                               "WANDB_MODE": "disabled", "HOME": str(root)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root, json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_failed_save_keeps_the_earlier_checkpoint_and_stops(failed_saves):
    root, out, _ = failed_saves
    stop = out["stop"]
    assert stop["step"] == 4
    message = stop["error"]
    assert message is not None and "\n" not in message
    assert ".tmp_step_00000004/state/__0_0.distcp" in message  # the file that failed
    assert "file-size limit" in message and "trainer.on_save_error=stop" in message
    assert "step_00000002" in message  # the checkpoint a resume will use
    assert stop["after_failure"] == ["step_00000002"]  # no partial .tmp_step_*, nothing older deleted
    cfg = load_train_config([f"trainer.run_dir={root / 'stop'}"])
    assert find_resume_checkpoint(cfg, root / "stop", Mesh()).name == "step_00000002"  # verified, intact


def test_failed_save_continues_and_keep_last_waits_for_a_good_save(failed_saves):
    _, out, stderr = failed_saves
    cont = out["continue"]
    assert cont["error"] is None and cont["step"] == 4
    assert cont["after_failure"] == ["step_00000002"]  # keep_last=1 kept the last good one while saving failed
    assert cont["final"] == ["step_00000006"]  # pruned once a newer save was complete
    assert "Training continues (trainer.on_save_error=continue, failure 1 of 3 in a row)" in stderr
    assert [e for e in cont["events"] if e["event"] == "save_failed"] == [
        {"event": "save_failed", "step": 4, "failures_in_a_row": 1}]


def _error(previous):
    return SaveError("checkpoint step_00000004 not saved: writing x failed", previous)


@pytest.mark.parametrize("mode,previous,fails_before_stop", [
    ("auto", Path("step_2"), 3), ("auto", None, 1), ("continue", None, 3), ("stop", Path("step_2"), 1)])
def test_policy_counts_failures_in_a_row(mode, previous, fails_before_stop):
    policy = SavePolicy(mode, max_save_failures=3)
    for _ in range(fails_before_stop - 1):
        assert "Training continues" in policy.failed(_error(previous), last=False)
    with pytest.raises(SaveError, match="Stopped"):
        policy.failed(_error(previous), last=False)
    policy.succeeded()
    assert policy.failures_in_a_row == 0


def test_a_failed_last_save_always_stops():
    with pytest.raises(SaveError, match="last save"):
        SavePolicy("continue", 3).failed(_error(Path("step_2")), last=True)


def test_on_save_error_and_max_save_failures_are_validated():
    from train.config.errors import ConfigError

    with pytest.raises(Exception, match="on_save_error"):
        load_train_config(["trainer.on_save_error=sometimes"])
    cfg = load_train_config(["trainer.max_save_failures=0"])
    with pytest.raises(ConfigError, match="trainer.max_save_failures=0 must be >= 1"):
        cfg.trainer.validate()
