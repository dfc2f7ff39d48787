"""`python -m train [overrides]` / `torchrun ... -m train [overrides]`: compose the config, validate it,
initialise distributed, build, train, close. Everything else lives in `train/trainer/`.
Rank 0 records the job's state in RUN_DIR/status.json (running, finished, stopped early by SIGTERM,
failed with the error: `train/runs.py`)."""
from __future__ import annotations

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from train.checkpoint import CheckpointError
from train.config import CONFIG_DIR, register_configs
from train.quick_exit import skip_final_collection
from train.runs import FAILED, FINISHED, RUNNING, STOPPED, write_status
from train.trainer import typed_config, validate_config
from train.trainer.validate import ConfigError, config_warnings
from train.trainer.init_from import apply_init_from

register_configs()


def job_run_dir(cfg) -> str:
    """This job's run dir: `trainer.run_dir`, else Hydra's output dir. In a multirun every job would share an
    explicit `trainer.run_dir` and resume the previous job's checkpoints, so each job gets `run_dir/<job number>`."""
    hydra_cfg = HydraConfig.get()
    if not cfg.trainer.run_dir:
        return hydra_cfg.runtime.output_dir
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return os.path.join(cfg.trainer.run_dir, str(hydra_cfg.job.num))
    return cfg.trainer.run_dir


class _Stop(Exception):
    """A failure whose message says everything: the job ends without a traceback."""


def _fail(message: str, multirun: bool) -> None:
    """End a failed job. One run exits with the message alone (a traceback adds nothing). In a multirun Hydra
    runs the jobs in this process and goes on to the next only after an Exception (SystemExit would end the
    whole sweep), recording the job as failed and exiting non-zero after the last one."""
    if multirun:
        raise RuntimeError(message)
    sys.exit(message)


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        cfg = typed_config(dcfg)
    except ConfigError as e:
        _fail(f"moeforge: {e}", multirun)
    if cfg.trainer.dry_run:  # before status.json: a dry run writes nothing to the run dir
        _dry_run(cfg, multirun)
        return
    is_main = os.environ.get("RANK", "0") == "0"
    run_dir = job_run_dir(cfg)  # the value rank 0 broadcasts below; status.json goes there from the start
    if is_main:
        write_status(run_dir, RUNNING)
    try:
        finished = _train(cfg)
    except BaseException as e:  # Exception, SystemExit from a config error, KeyboardInterrupt
        if is_main:
            write_status(run_dir, FAILED, str(e) or type(e).__name__)
        if isinstance(e, _Stop):
            _fail(str(e), multirun)
        raise
    if is_main:  # SIGTERM (preemption, a time limit) ends fit() early with a checkpoint: resumable, not finished
        write_status(run_dir, FINISHED if finished else STOPPED)


def _dry_run(cfg, multirun: bool) -> None:
    """`trainer.dry_run=true`: the checks of a start (train/trainer/dry_run.py), a summary and one JSON line."""
    import json

    from train.trainer.dry_run import dry_run, summary_lines

    try:
        apply_init_from(cfg, HydraConfig.get().overrides.task)
        result = dry_run(cfg)
    except (ConfigError, CheckpointError) as e:
        _fail(f"moeforge: {e}", multirun)
        return
    for warning in config_warnings(cfg):
        print(f"moeforge: warning: {warning}", file=sys.stderr)
    print("\n".join(summary_lines(result)))
    print(json.dumps(result))


def _note_cpu_threads(cfg) -> None:
    """One process on CPU uses a thread per core (torchrun sets OMP_NUM_THREADS=1 per rank, one process does not):
    on a machine shared with other jobs those threads contend and a step can take several times longer. Say so
    once, with the fix, unless the user chose a thread count."""
    if "OMP_NUM_THREADS" in os.environ or "RANK" in os.environ or str(cfg.trainer.device) == "cuda":
        return
    import torch

    if str(cfg.trainer.device) == "auto" and torch.cuda.is_available():
        return
    print(f"moeforge: note: training on CPU with {torch.get_num_threads()} threads (one per core); on a machine "
          f"shared with other jobs set OMP_NUM_THREADS to this job's share of the cores", file=sys.stderr)


def _train(cfg) -> bool:
    """Validate, build and train; True when the run reached `trainer.max_steps`."""
    try:
        apply_init_from(cfg, HydraConfig.get().overrides.task)  # the checkpoint's architecture, before validation
        validate_config(cfg)  # before any process group, file or tensor exists
        if os.environ.get("RANK", "0") == "0":
            for warning in config_warnings(cfg):
                print(f"moeforge: warning: {warning}", file=sys.stderr)
    except (ConfigError, CheckpointError) as e:  # the message names the field and the fix; a traceback adds nothing
        raise _Stop(f"moeforge: {e}") from None

    _note_cpu_threads(cfg)
    import parallel
    from train.trainer.health import TrainingStopped
    from train.trainer.loop import Trainer
    from train.trainer.watchdog import collective_timeout_s

    mesh = parallel.init_distributed(cfg, timeout_s=collective_timeout_s(cfg.trainer.watchdog_s))
    # Without trainer.run_dir each rank's Hydra picks a timestamped dir; rank 0's is the run's.
    cfg.trainer.run_dir = parallel.broadcast_object(job_run_dir(cfg), mesh)
    trainer = None
    try:
        trainer = Trainer(cfg, mesh)
        trainer.fit()
        return trainer.state.step >= cfg.trainer.max_steps
    except (ConfigError, CheckpointError, TrainingStopped) as e:  # a tampered checkpoint, too many bad steps, ...
        raise _Stop(f"moeforge: {e}") from None
    finally:
        if trainer is not None:
            trainer.close()
        parallel.shutdown(mesh)


# A dry run leaves no trace, Hydra's own included: no .hydra/ snapshot, no job log file in the run dir.
DRY_RUN_HYDRA = ("hydra.output_subdir=null", "hydra/job_logging=stdout",
                 "hydra.run.dir=${oc.env:TMPDIR,/tmp}/moeforge-dry-run")

def _check_run_dir(argv) -> None:
    """A run dir given on the command line that cannot be written ends the job in one line, before Hydra creates it
    and opens its log file there (a traceback from deep inside Hydra otherwise)."""
    from train.runs import run_dir_problem

    for arg in argv:
        key, _, value = arg.partition("=")
        if key.lstrip("+") in ("trainer.run_dir", "hydra.run.dir") and value and "${" not in value:
            problem = run_dir_problem(value)
            if problem:
                sys.exit(f"moeforge: {key.lstrip('+')}={value} cannot be written: {problem}; choose a writable "
                         f"trainer.run_dir")


if __name__ == "__main__":
    _check_run_dir(sys.argv[1:])
    skip_final_collection()  # about a second less per rank at exit
    if any(a.lower() in ("trainer.dry_run=true", "++trainer.dry_run=true") for a in sys.argv[1:]):
        sys.argv += [o for o in DRY_RUN_HYDRA if o.split("=")[0] not in {a.split("=")[0] for a in sys.argv}]
    main()
