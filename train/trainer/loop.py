"""`Trainer`: builds one run (data, model, optimizer, state, logger), trains it, validates, checkpoints.

Build order and why: the checkpoint to resume, if any, is found first, because the model's routing groups come
from it (train/config/routing.py: fixed at a run's first start, kept whatever the new ep_size); they go into the
run record (`RunRecord`, with the derived batch arithmetic), never back into the config; data next (its
tokenizer fixes the vocabulary the model must cover); then the model and its engine come from the one build
pipeline (`train/build.py`: meta build, converters, expert parallelism, checkpointing, materialise with the seed
drawn from `trainer.seed`, this run's weights, compile and engine); a resume then restores the engine's optimizer
state, resharded into this layout, counters and data position.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import torch
from omegaconf import OmegaConf

import parallel
from train import checkpoint as ckpt_io
from train.checkpoint import load_config
from train.config import TrainConfig
from train.data import build_data
from train.data.indexed import TokenFileError
from train.data.sources import DataError
from train.build import EngineArgs, build_model
from train.flops import flops_per_token
from train.model.transformer import draw_init_seed
from train.checkpoint.save_errors import SaveError
from train.checkpoint.save_resume import COMMON_FILE, find_resume_checkpoint, load_weights, resume_from, save_checkpoint
from train.trainer.logger import RunLogger
from train.trainer.peak_flops import MEASURE, resolve_peak_flops
from train.precision import build_precision
from train.trainer.health import StepHealth, TrainingStopped
from train.trainer.faults import nan_steps_from_env
from train.trainer.preemption import PreemptionGuard
from train.trainer.run_record import RunRecord
from train.trainer.save_policy import SavePolicy
from train.trainer.schedule import LRSchedule
from train.trainer.state import TrainState, seed_everything
from train.trainer.step import StepContext, train_step
from train.trainer.validate import ConfigError
from train.trainer.watchdog import Watchdog
from train.runs import STOPPED, write_status

log = logging.getLogger("train")


class Trainer:
    """One training run on this rank. `fit()` trains to `trainer.max_steps`; `close()` releases the sinks."""

    def __init__(self, cfg: TrainConfig, mesh, run_dir: Optional[Path] = None):
        self.cfg, self.mesh = cfg, mesh
        self.run_dir = Path(run_dir or cfg.trainer.run_dir)
        self.is_main = mesh.rank == 0
        self._warned_no_val = False
        t = cfg.trainer
        self.save_policy = SavePolicy(t.on_save_error, t.max_save_failures)
        self.resumed_from = find_resume_checkpoint(cfg, self.run_dir, mesh)
        self.record = self._resolve_record()
        # what every config.yaml of this run holds: the config with the record's routing groups (where resume,
        # init_from, generate and export have always read them); self.cfg itself stays as composed
        self.saved_cfg = self.record.stamped(cfg)
        self.precision = build_precision(cfg.precision, mesh.device)
        self.data = self._build_data()
        if self.data.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"the tokenizer has {self.data.vocab_size} tokens but model.vocab_size="
                              f"{cfg.model.vocab_size}: raise model.vocab_size or lower data.tokenizer_vocab_size")

        seed_everything(t.seed)  # the same init seed on every rank
        self.initialised_from: Optional[Path] = None
        built = build_model(self.saved_cfg, mesh, init_seed=draw_init_seed(), weights=self._load_weights,
                            engine_args=EngineArgs(self.data.grad_accum_steps, self.run_dir))
        model, engine = built.model, built.engine
        self.schedule = LRSchedule(cfg.optim, t.max_steps)
        self.state = TrainState(model=model, engine=engine, scheduler=self.schedule, data=self.data)
        if self.resumed_from is not None:
            resume_from(self.state, self.resumed_from, cfg, mesh)

        self.ctx = StepContext(precision=self.precision, schedule=self.schedule, mesh=mesh,
                               tokens_per_step=t.global_batch_size * t.seq_len, nan_steps=nan_steps_from_env())
        self.watchdog = Watchdog(t.watchdog_s, mesh.rank, self.run_dir)
        self.flops_per_token = flops_per_token(cfg.model, t.seq_len)
        if t.peak_flops == MEASURE:  # rank 0 measures (ranks sharing a CPU would contend), every rank uses it
            peak = resolve_peak_flops(t.peak_flops, mesh.device, cfg.precision.name) if self.is_main else None
            peak = parallel.broadcast_object(peak, mesh)
        else:
            peak = resolve_peak_flops(t.peak_flops, mesh.device, cfg.precision.name)
        self.peak_flops, self.peak_flops_source = peak.value, peak.source
        self._write_config()
        self.logger = RunLogger(cfg.logging, self.run_dir, self.is_main, t.max_steps, self.state.step,
                                run_config=OmegaConf.to_container(OmegaConf.structured(cfg)),
                                wandb_run_id=self.state.wandb_run_id)
        self.state.wandb_run_id = self.logger.wandb_run_id
        for report in built.reports:
            self.logger.info(report)
        where = (f"resumed from {self.resumed_from}" if self.resumed_from else
                 f"new run initialised from {self.initialised_from}" if self.initialised_from else "new run")
        if self.resumed_from and t.init_from is not None:
            where += f" (trainer.resume wins: trainer.init_from={t.init_from} weights not loaded)"
        self.logger.info(f"{where}: step {self.state.step}/{t.max_steps}, run_dir {self.run_dir}, "
                         f"{mesh.world_size} rank(s), {self.data.grad_accum_steps} micro-batch(es) per step, "
                         f"device {mesh.device}, precision {cfg.precision.name}"
                         f"{'' if self.precision.recipe is None else ' recipe=' + self.precision.recipe.value}, "
                         f"MFU against {self.peak_flops:.3g} FLOP/s per device ({peak.source})")

    def _load_weights(self, model) -> None:
        """The build pipeline's load step: a resume's weights, else `init_from`'s, else the initialised ones."""
        t = self.cfg.trainer
        if self.resumed_from is not None:  # verified file by file by find_resume_checkpoint: not hashed again
            load_weights(model, self.resumed_from, self.mesh, verify=False)
        elif t.init_from is not None:  # architecture and tokenizer already taken by train.trainer.init_from
            self.initialised_from = load_weights(model, t.init_from, self.mesh, self.saved_cfg.model)

    def _build_data(self):
        """The data module, its file checks and, when resuming, the check that the checkpoint's data position
        still fits these files: all before the model is built, each failure one line (`ConfigError`)."""
        try:
            data = build_data(self.cfg, self.mesh.dp_rank, self.mesh.dp_size, self.is_main,
                              barrier=lambda: parallel.barrier(self.mesh))
            if self.resumed_from is not None:
                common = ckpt_io.load_torch_file(self.resumed_from / COMMON_FILE)
                if "data" in common:
                    data.check_resumable(common["data"])
        except (TokenFileError, DataError) as e:
            raise ConfigError(str(e)) from None
        except ValueError as e:
            if self.resumed_from is None:
                raise
            raise ConfigError(f"{e} (resuming {self.resumed_from})") from None
        return data

    def _resolve_record(self) -> RunRecord:
        """This run's record: the routing groups (the stored value of the checkpoint it resumes, else this run's
        ep_size when a device limit is set) and the batch arithmetic, before the model is built."""
        stored = load_config(self.resumed_from).model if self.resumed_from is not None else None
        return RunRecord.resolve(self.cfg, self.mesh.world_size, stored,
                                 f"the checkpoint {self.resumed_from} being resumed")

    def _write_config(self) -> None:
        """The resolved config at RUN_DIR/config.yaml (and the run record at RUN_DIR/run_record.json); a resumed
        run with a changed config keeps the old file and writes its own next to it."""
        if not self.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.record.save(self.run_dir)
        text = OmegaConf.to_yaml(OmegaConf.structured(self.saved_cfg))
        path = self.run_dir / "config.yaml"
        if path.exists() and path.read_text() != text:
            path = self.run_dir / f"config.resume_step{self.state.step:08d}.yaml"
        path.write_text(text)

    def fit(self, stop_at: Optional[int] = None) -> None:
        """Train until `trainer.max_steps`, validating every `eval_every` steps and saving every `save_every`.
        `stop_at` ends the process early (as a time limit or preemption would) without changing the schedule.
        SIGTERM on any rank ends the run after the current step with a checkpoint (`preemption.py`). A rank whose
        steps stop for `trainer.watchdog_s` dumps its stacks and exits (`watchdog.py`): the first step (compiling),
        saves and evaluations run under its longer allowance."""
        with PreemptionGuard() as preemption, self.watchdog:
            self._train_until(stop_at, preemption)

    def _train_until(self, stop_at: Optional[int], preemption: PreemptionGuard) -> None:
        t = self.cfg.trainer
        last = t.max_steps if stop_at is None else min(stop_at, t.max_steps)
        health = StepHealth(t.max_bad_steps)
        while self.state.step < last:
            start = time.perf_counter()
            micro_batches = self.data.next_global_batch_for_rank()
            record = train_step(self.state, micro_batches, self.ctx)
            self.watchdog.beat(self.state.step)
            record["data_wait_s"] = self.data.last_wait_s
            record.update({f"data/samples/{name}": n for name, n in self.data.samples_per_source().items()})
            elapsed = time.perf_counter() - start  # finalize() read values back, so the device is synced
            record["tokens_per_s"] = self.ctx.tokens_per_step / elapsed
            record["mfu"] = self.flops_per_token * record["tokens_per_s"] / (self.peak_flops * self.mesh.world_size)
            step = self.state.step
            if t.eval_every > 0 and (step % t.eval_every == 0 or step == t.max_steps):
                with self.watchdog.slow("an evaluation"):
                    record.update(self.evaluate())
            self.logger.log(record)
            for event in health.observe(record):
                self.logger.event(event)
            if health.should_stop:
                self._stop_on_bad_steps(health, record)
            saved = step % t.save_every == 0 or step == t.max_steps
            if saved:
                self.save(last=step == t.max_steps)
            if preemption.requested(self.mesh):
                if not saved:
                    self.save(last=True)
                if self.is_main:  # before any rank exits: a launcher on another node reads it (launch/torchrun.sh)
                    write_status(self.run_dir, STOPPED)
                parallel.barrier(self.mesh)
                self.logger.info(f"stopping after step {step} on SIGTERM (preemption or time limit) with a complete "
                                 f"checkpoint; re-run the same command to continue")
                return

    def _stop_on_bad_steps(self, health: StepHealth, record: dict) -> None:
        """Save the last good state (skipped steps changed no weight or optimizer state) and stop."""
        path = self.save() or (Path(self.run_dir) / "checkpoints")
        where = ", ".join(record.get("nonfinite_params", [])[:4]) or "not known (partitioned gradients)"
        raise TrainingStopped(
            f"{health.consecutive_bad} consecutive non-finite steps (steps {health.bad_steps[0]}-{health.bad_steps[-1]}, "
            f"trainer.max_bad_steps={health.max_bad_steps}; non-finite gradients in: {where}): stopped with the last "
            f"good weights saved in {path}. Lower optim.lr or raise optim.warmup_steps, check the data of those steps, "
            f"then re-run the same command to continue from that checkpoint")

    def save(self, last: bool = False) -> Optional[Path]:
        """Save a checkpoint; after a failed save, continue (None) or stop as `trainer.on_save_error` says."""
        try:
            with self.watchdog.slow("a checkpoint save"):
                path = save_checkpoint(self.state, self.saved_cfg, self.mesh, self.run_dir, self.data.tokenizer_dir)
        except SaveError as e:
            line = self.save_policy.failed(e, last)  # raises when the run stops
            self.logger.event({"event": "save_failed", "step": self.state.step,
                               "failures_in_a_row": self.save_policy.failures_in_a_row})
            self.logger.info(line)
            return None
        self.save_policy.succeeded()
        if path is not None:
            self.logger.info(f"saved checkpoint {path}")
        return path

    @torch.no_grad()
    def evaluate(self) -> dict:
        """`val/<source>/loss`: mean next-token loss (`lm_loss`) over `trainer.eval_batches` fixed global batches of
        each source's held-out windows, all ranks; `val_loss`: their mean weighted by `data.weights` (renormalised
        over the sources that have validation windows). Empty when no source has any."""
        data = self.data
        evaluated = [i for i, s in enumerate(data.sources) if s.num_val_windows > 0]
        if not evaluated:
            if not self._warned_no_val:
                self.logger.info("no validation data (raise data.val_fraction): val_loss is not logged")
                self._warned_no_val = True
            return {}
        model = self.state.model
        model.eval()
        total = torch.zeros(len(evaluated), 2, dtype=torch.float64)
        runner = self.state.engine.runner
        for row, i in enumerate(evaluated):
            for mb in data.val_batches(i, self.cfg.trainer.eval_batches):
                if runner is not None:  # a pipeline: the loss comes out of the last stage (zeros elsewhere)
                    lm_loss = runner.evaluate(mb, self.precision.autocast)
                    if lm_loss is not None:
                        total[row] += torch.tensor([float(lm_loss), 1.0], dtype=torch.float64)
                    continue
                extra = {}
                if "document_ids" in mb:
                    extra["document_ids"] = mb["document_ids"].to(self.mesh.device)
                with self.precision.autocast():  # uncompiled; ZeRO-3's module hooks gather partitioned weights too
                    out = model(mb["input_ids"].to(self.mesh.device), mb["labels"].to(self.mesh.device), **extra)
                total[row] += torch.tensor([float(out.lm_loss), 1.0], dtype=torch.float64)
        model.train()
        total = parallel.all_reduce_stats(total.to(self.mesh.device), self.mesh).cpu()
        losses = (total[:, 0] / total[:, 1]).tolist()
        record = {f"val/{data.source_names[i]}/loss": loss for i, loss in zip(evaluated, losses)}
        weights = [data.weights[i] for i in evaluated]
        record["val_loss"] = sum(w * loss for w, loss in zip(weights, losses)) / sum(weights)
        return record

    def close(self) -> None:
        self.data.close()
        self.logger.close()
