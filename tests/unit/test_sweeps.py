"""The ready-made sweeps in configs/sweep/ and the SLURM launcher config compose, and the report reads a sweep."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from train.config import CONFIG_DIR, register_configs
from train.runs import FAILED, FINISHED, RUNNING, run_state, write_status
from train.sweep import loss_at_flops, summarize_sweep

SWEEPS = sorted(p.stem for p in (Path(CONFIG_DIR) / "sweep").glob("*.yaml"))


def _compose_with_hydra(overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_config_sets_sweeper_params_only(name):
    cfg = _compose_with_hydra([f"sweep={name}"])
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    assert params and all((k.startswith("model.moe.") or k == "model") and "," in v for k, v in params.items())
    plain = _compose_with_hydra([])
    cfg_job = {k: v for k, v in cfg.items() if k != "hydra"}
    assert cfg_job == {k: v for k, v in plain.items() if k != "hydra"}  # the job's config is untouched
    for key, values in params.items():  # every swept value composes onto the typed schema
        for v in str(values).split(","):
            _compose_with_hydra([f"{key}={v}"])


def test_status_and_dead_process(tmp_path):
    write_status(tmp_path, RUNNING)
    assert run_state(tmp_path)[0] == RUNNING  # this process is alive
    status = json.loads((tmp_path / "status.json").read_text())
    status["pid"] = 2 ** 22 + 12345  # above Linux's pid_max default: no such process
    (tmp_path / "status.json").write_text(json.dumps(status))
    state, reason = run_state(tmp_path)
    assert state == FAILED and "died" in reason
    write_status(tmp_path, FAILED, "boom")
    assert run_state(tmp_path) == (FAILED, "boom")
    write_status(tmp_path, FINISHED)
    assert run_state(tmp_path) == (FINISHED, None)


def _fake_job(sweep, num, granularity, losses, status):
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    overrides = [f"model.moe.granularity={granularity}", f"trainer.max_steps={len(losses) if status else 3}"]
    (job / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))
    cfg = _compose_with_hydra(overrides)
    (job / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml({k: v for k, v in cfg.items() if k != "hydra"}))
    with open(job / "metrics.jsonl", "w") as f:
        for i, loss in enumerate(losses, 1):
            f.write(json.dumps({"step": i, "loss": loss, "tokens": 100 * i, "tokens_per_s": 10.0,
                                "moe/layer0/load_max": 1.5, "moe/dropped_frac": 0.0}) + "\n")
    if status:
        write_status(job, status)


def test_summarize_sweep_lists_pending_and_compares_at_equal_flops(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    OmegaConf.save(OmegaConf.create({"hydra": {"sweeper": {"params": {"model.moe.granularity": "1,2,4"}},
                                               "overrides": {"task": ["trainer.max_steps=3"]}}}),
                   sweep / "multirun.yaml")
    _fake_job(sweep, 0, 1, [3.0, 2.0, 1.0], FINISHED)
    _fake_job(sweep, 1, 2, [3.0, 2.5], None)  # no status.json, metrics stop early: still running
    keys, runs = summarize_sweep(sweep)
    assert keys == ["model.moe.granularity"]
    assert [(s.num, s.state, s.swept["model.moe.granularity"]) for s in runs] == [
        (0, FINISHED, "1"), (1, RUNNING, "2"), (2, "pending", "4")]  # job 2 never started: listed, not missing
    assert runs[0].train_loss == 1.0 and runs[0].load_imbalance == 1.5 and runs[0].tokens_per_s == 10.0
    budget = runs[1].curve_flops[-1]
    # Granularity keeps the expert compute; only the router (m·N outputs) grows.
    assert runs[0].flops_per_token == pytest.approx(runs[1].flops_per_token, rel=0.01)
    assert loss_at_flops(runs[0], budget) == pytest.approx(2.0, rel=0.01)  # runs[0] is a little cheaper per token
    assert loss_at_flops(runs[1], budget) == pytest.approx(2.5)


def test_slurm_launcher_config_composes():
    # The submitit plugin is the optional `slurm` extra; no SLURM here, so only the composition is checked.
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = _compose_with_hydra(["hydra/launcher=slurm", "sweep=granularity", "hydra.launcher.partition=gpu"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 1, 1)


def test_status_write_on_a_full_disk_falls_back_then_gives_up_quietly(tmp_path, monkeypatch, capsys):
    import errno
    from pathlib import Path

    from train import runs

    runs.write_status(tmp_path, runs.RUNNING)
    real = Path.write_text

    def enospc(self, *a, **k):
        if self.name.startswith(".status.json.tmp"):
            real(self, "{")  # a partial temporary file, as a full disk leaves
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", enospc)
    assert runs.write_status(tmp_path, runs.FAILED, "disk full") is True  # in place: no new block needed
    assert runs.read_status(tmp_path)["state"] == "failed"
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]  # the partial temporary file is gone

    import builtins
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full"))
                        if str(f).endswith("status.json") else real_open(f, *a, **k))
    assert runs.write_status(tmp_path, runs.FINISHED) is False  # no exception over the failure being recorded
    assert "could not record state 'finished'" in capsys.readouterr().err


def test_a_run_dir_that_cannot_be_written_is_named_before_hydra_starts(tmp_path, monkeypatch):
    import os

    from train import runs

    assert runs.run_dir_problem(tmp_path / "new" / "run") is None
    (tmp_path / "afile").write_text("x")
    assert runs.run_dir_problem(tmp_path / "afile" / "run") == f"{tmp_path / 'afile'} is a file, not a directory"
    monkeypatch.setattr(os, "access", lambda *a, **k: False)  # a read-only mount (tests may run as root)
    assert "read-only file system" in runs.run_dir_problem(tmp_path / "run") or \
        "not writable" in runs.run_dir_problem(tmp_path / "run")


def test_one_cpu_process_without_a_thread_count_is_told_how_to_share(monkeypatch, capsys):
    from train.__main__ import _note_cpu_threads
    from train.config import load_train_config

    cfg = load_train_config(["trainer.device=cpu"])
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    _note_cpu_threads(cfg)
    assert "set OMP_NUM_THREADS to this job's share" in capsys.readouterr().err
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    _note_cpu_threads(cfg)
    assert capsys.readouterr().err == ""
