"""Reading a Hydra multirun: which jobs it holds, what each swept, and one summary per job (`scripts/sweep_report.py`).

The job list comes from SWEEP_DIR/multirun.yaml, expanded as the basic sweeper expands it (`hydra.sweeper.params`
then the command line's overrides, a cartesian product in order: job i is the i-th combination), so a job that
has not started yet (a queued SLURM job) is listed as `pending` rather than missing. Job i's Hydra dir is
SWEEP_DIR/i; its run dir is the same, or `trainer.run_dir/i` when the sweep set one (`train/__main__.py`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from omegaconf import OmegaConf

from train.runs import FAILED, read_records, run_state, series

PENDING = "pending"


@dataclass
class Job:
    num: int
    overrides: list[str]  # "key=value" as the job received them
    job_dir: Path
    run_dir: Path


@dataclass
class JobSummary:
    """What one job did. Numbers are None where the job has nothing to say (no steps, a config that failed)."""

    num: int
    state: str
    reason: Optional[str]
    swept: dict[str, str]
    total_params: Optional[int] = None
    active_params: Optional[int] = None
    flops_per_token: Optional[float] = None
    max_steps: Optional[int] = None
    steps: int = 0
    train_loss: Optional[float] = None
    val_loss: Optional[float] = None
    tokens_per_s: Optional[float] = None
    load_imbalance: Optional[float] = None  # most-loaded expert / even share: mean over MoE layers and the tail
    dropped_frac: Optional[float] = None  # mean over the tail
    curve_steps: list[int] = field(default_factory=list)
    curve_flops: list[float] = field(default_factory=list)  # cumulative training FLOPs at each step
    curve_loss: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)  # the evaluations: (step, val_loss)
    val_losses: list[float] = field(default_factory=list)


def _expand(sweep_dir: Path) -> Optional[list[list[str]]]:
    """Each job's overrides in job order, from multirun.yaml; None when there is no multirun.yaml."""
    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    hydra_cfg = OmegaConf.load(path).hydra
    params = hydra_cfg.sweeper.get("params")
    params = OmegaConf.to_container(params, resolve=False) if params is not None else {}
    args = [f"{k}={v}" for k, v in params.items()] + list(hydra_cfg.overrides.task)
    overrides = OverridesParser.create().parse_overrides(args)
    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def sweep_jobs(sweep_dir: Path) -> list[Job]:
    """Every job of the sweep, started or not, in job order."""
    sweep_dir = Path(sweep_dir)
    expanded = _expand(sweep_dir) or []
    on_disk = {int(p.name): p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()}
    jobs = []
    for num in sorted(set(range(len(expanded))) | set(on_disk)):
        job_dir = sweep_dir / str(num)
        overrides = expanded[num] if num < len(expanded) else []
        saved = job_dir / ".hydra" / "overrides.yaml"
        if saved.is_file():
            overrides = list(OmegaConf.load(saved))
        run_dir = job_dir
        explicit = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+") == "trainer.run_dir"]
        if explicit and explicit[-1] not in ("", "null"):
            run_dir = Path(explicit[-1]) / str(num)
        jobs.append(Job(num, overrides, job_dir, run_dir))
    return jobs


def swept_keys(jobs: list[Job]) -> list[str]:
    """The override keys whose value differs between jobs, in the order they were given."""
    values: dict[str, set] = {}
    for job in jobs:
        for key, value in _split(job):
            values.setdefault(key, set()).add(value)
    varying = [k for k, v in values.items() if len(v) > 1 or any(k not in dict(_split(j)) for j in jobs)]
    return [k for k in varying if k not in ("trainer.run_dir", "hydra.sweep.dir")]


def _split(job: Job) -> list[tuple[str, str]]:
    return [tuple(o.partition("=")[::2]) for o in job.overrides]


def _job_config(job: Job):
    """The job's TrainConfig: the run's config.yaml, else the one Hydra composed (a job that failed early)."""
    from train.checkpoint import load_config

    for d in (job.run_dir, job.job_dir / ".hydra"):
        if (d / "config.yaml").is_file():
            return load_config(d)
    return None


def _tail_mean(records: list[dict], keys) -> Optional[float]:
    """Mean of `keys` over the last tenth of the steps (at least one): less noisy than the last step alone."""
    tail = records[-max(1, len(records) // 10):]
    vals = [r[k] for r in tail for k in keys if isinstance(r.get(k), (int, float))]
    return float(np.mean(vals)) if vals else None


def summarize_job(job: Job, keys: list[str]) -> JobSummary:
    """Status, sizes, final losses, speed, balance and the loss curve of one job."""
    overrides = dict(_split(job))
    swept = {k: overrides.get(k, "") for k in keys}
    if not job.job_dir.is_dir() and not job.run_dir.is_dir():
        return JobSummary(job.num, PENDING, "not started", swept)
    try:
        cfg = _job_config(job)
    except Exception:  # noqa: BLE001 - a config that no longer loads leaves the sizes blank, nothing more
        cfg = None
    max_steps = cfg.trainer.max_steps if cfg is not None else None
    state, reason = run_state(job.run_dir, max_steps)
    s = JobSummary(job.num, state, reason, swept, max_steps=max_steps)
    if cfg is not None and (state != FAILED or read_records(job.run_dir)):  # a shape that failed has no size
        try:
            from train.flops import flops_per_token, param_breakdown

            b = param_breakdown(cfg.model)
            s.total_params, s.active_params = b.total, b.active
            s.flops_per_token = flops_per_token(cfg.model, cfg.trainer.seq_len)
        except Exception:  # noqa: BLE001 - an invalid shape (the reason the job failed) has no size
            pass
    records = [r for r in read_records(job.run_dir) if "loss" in r]
    if not records:
        return s
    last = records[-1]
    s.steps, s.train_loss = int(last["step"]), float(last["loss"])
    s.val_steps, s.val_losses = series(records, "val_loss")
    s.val_loss = float(s.val_losses[-1]) if s.val_losses else None
    speeds = [r["tokens_per_s"] for r in records[1:] if isinstance(r.get("tokens_per_s"), (int, float))]
    s.tokens_per_s = float(np.median(speeds)) if speeds else None  # step 1 pays the warm-up
    s.load_imbalance = _tail_mean(records, [k for k in last if k.startswith("moe/layer") and k.endswith("/load_max")])
    s.dropped_frac = _tail_mean(records, ["moe/dropped_frac"])
    s.curve_steps = [int(r["step"]) for r in records]
    s.curve_loss = [float(r["loss"]) for r in records]
    if s.flops_per_token is not None and all("tokens" in r for r in records):
        s.curve_flops = [float(r["tokens"]) * s.flops_per_token for r in records]
    return s


def loss_at_flops(s: JobSummary, budget: float) -> Optional[float]:
    """The job's train loss at `budget` cumulative training FLOPs: the mean over its steps in the last tenth of
    the budget (one step's loss is noisy), or the value between two steps when none falls there; None if the job
    never got that far."""
    if not s.curve_flops or s.curve_flops[-1] < budget * (1 - 1e-9):
        return None
    window = [loss for f, loss in zip(s.curve_flops, s.curve_loss) if 0.9 * budget < f <= budget * (1 + 1e-9)]
    return float(np.mean(window)) if window else float(np.interp(budget, s.curve_flops, s.curve_loss))


def summarize_sweep(sweep_dir: Path) -> tuple[list[str], list[JobSummary]]:
    """(swept keys, one summary per job in job order)."""
    jobs = sweep_jobs(sweep_dir)
    keys = swept_keys(jobs)
    return keys, [summarize_job(j, keys) for j in jobs]
