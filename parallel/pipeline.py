"""Pipeline parallelism (`parallel.pp_size` > 1): which rank runs which layers, the schedule, and the engine step.

The split (`split_pipeline`, the build pipeline's step 1b; no process group needed): the layers are cut into
pp_size x pp_virtual_stages chunks of `train.config.pipeline.stage_layout` consecutive layers; chunk c runs on
pipeline rank c mod pp_size (looped placement, as Megatron's and torch's interleaved schedules expect). The
embedding is on the first chunk's rank, the final norm, head and MTP modules on the last chunk's rank (with a copy
of the embedding there when MTP or a tied head needs it: `train/model/stage.py`). Each rank keeps only its share
of the meta model, so nothing else is ever allocated; expert parallelism then splits every stage's experts over
that stage's EP group exactly as for a whole model.

The schedule is torch.distributed.pipelining's: `1f1b` (`Schedule1F1B`, or `ScheduleInterleaved1F1B` with
pp_virtual_stages > 1), `interleaved_1f1b` (`ScheduleInterleaved1F1B`) and `zero_bubble`
(`ScheduleInterleavedZeroBubble`: input and weight gradients computed apart, the weight ones filling the bubble).
All ranks of a stage run the same schedule in the same order, so the MoE layers' collectives (all-to-all over
the EP group, balance counts over the stage) match inside a stage as they do without pipelining. Gradients are
those of the mean over the step's micro-batches (`scale_grads`), as the plain engine's 1/accum scaling gives.

The engine (`PipelineEngine`): after the schedule, each stage reduces its gradients over its data-parallel ranks
(`reduce_gradients`), the embedding's two copies sum theirs over the first and last stage, the clipping norm sums
every stage's squares (the copy counted once), and the optimizer updates each stage's own parameters.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from parallel.engine import LocalEngine, StepOutcome
from parallel.grads import clip_grad_norm_, reduce_gradients
from parallel.mesh import Mesh
from parallel.zero1 import PartitionedOptimizer
from train.model.stage import EMBEDDING, ModelChunk, keep_share, merge_outputs, needs_embedding_copy


@dataclass
class PipelineSplit:
    """This rank's chunks (global chunk index, module), in schedule order, and `copies`: parameter names this rank
    holds although an earlier stage holds them too (the last stage's embedding copy)."""

    chunks: list[tuple[int, ModelChunk]]
    num_chunks: int
    copies: frozenset = field(default_factory=frozenset)
    shares_embedding: bool = False  # this rank's embedding has a twin on the other end of the pipeline


def chunk_layers(layout: list[int]) -> list[range]:
    """The global layer indices of every chunk, in pipeline order, from layers per chunk."""
    out, start = [], 0
    for n in layout:
        out.append(range(start, start + n))
        start += n
    return out


def split_pipeline(model: nn.Module, layout: list[int], pp_size: int, pp_rank: int) -> PipelineSplit:
    """Prune the meta `model` in place to pipeline rank `pp_rank`'s share of `layout` (transformer layers per
    chunk, `train.config.pipeline.stage_layout`; chunk c on rank c mod pp_size) and return its chunks (module
    docstring)."""
    layers = chunk_layers(layout)
    n, P = len(layout), pp_size
    mine = [c for c in range(n) if c % P == pp_rank]
    has_first, has_last = 0 in mine, n - 1 in mine
    shares = needs_embedding_copy(model.cfg)
    copy = has_last and not has_first and shares
    keep_share(model, [i for c in mine for i in layers[c]], embed=has_first or copy, head=has_last)
    chunks = [(c, ModelChunk(model, layers[c], first=c == 0, last=c == n - 1)) for c in mine]
    return PipelineSplit(chunks, n, frozenset({EMBEDDING}) if copy else frozenset(),
                         shares_embedding=shares and (has_first or has_last))


def _schedule_class(name: str, virtual: int):
    from torch.distributed.pipelining import (Schedule1F1B, ScheduleInterleaved1F1B,
                                              ScheduleInterleavedZeroBubble)

    if name == "zero_bubble":
        return ScheduleInterleavedZeroBubble
    if name == "interleaved_1f1b" or virtual > 1:
        return ScheduleInterleaved1F1B
    return Schedule1F1B


CHUNK_INPUTS = ("input_ids", "labels", "document_ids")  # document ids only with data.document_mask


class _Loss:
    """The schedule's loss function: the last chunk returns the micro-batch's loss itself (it needs the labels for
    MTP and the chunked head). `poisoned`: times NaN, a deliberately bad step (train/trainer/faults.py)."""

    poisoned = False

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return output * float("nan") if self.poisoned else output


class PipelineRunner:
    """Runs micro-batches through this rank's chunks under the configured schedule (collective over the world:
    every rank of every stage calls `train` / `evaluate` with the same number of micro-batches)."""

    def __init__(self, split: PipelineSplit, cfg, mesh: Mesh, micro_batches: int, hidden_dtype: torch.dtype):
        from torch.distributed.pipelining import PipelineStage
        from torch.distributed.pipelining.schedules import PipelineScheduleSingle

        self.split, self.mesh, self.cfg = split, mesh, cfg
        self.hidden_dtype = hidden_dtype
        self.micro_batches = micro_batches
        t, d = cfg.trainer, cfg.model.d_model
        b, T = t.micro_batch_size, t.seq_len
        self.stages = []
        for c, chunk in split.chunks:
            meta = torch.device("meta")
            # hidden states need requires_grad in the metadata: the received buffers then carry the gradient back
            x = (torch.empty(b, T, dtype=torch.long, device=meta) if chunk.first
                 else torch.empty(b, T, d, dtype=hidden_dtype, device=meta, requires_grad=True))
            y = (torch.empty((), dtype=torch.float32, device=meta, requires_grad=True) if chunk.last
                 else torch.empty(b, T, d, dtype=hidden_dtype, device=meta, requires_grad=True))
            self.stages.append(PipelineStage(chunk, c, split.num_chunks, mesh.device, input_args=x, output_args=y,
                                             group=mesh.pp_group))
        cls = _schedule_class(cfg.parallel.pp_schedule, cfg.parallel.pp_virtual_stages)
        stages = self.stages[0] if issubclass(cls, PipelineScheduleSingle) else self.stages  # one stage, or a list
        self.loss_fn = _Loss()
        self.schedule = cls(stages, n_microbatches=micro_batches, loss_fn=self.loss_fn, scale_grads=True)

    @property
    def holds_last(self) -> bool:
        return any(chunk.last for _, chunk in self.split.chunks)

    def _drain(self) -> list:
        """Per micro-batch, this rank's chunks' outputs merged (`merge_outputs`), in micro-batch order."""
        per_chunk = [chunk.outputs for _, chunk in self.split.chunks]
        for _, chunk in self.split.chunks:
            chunk.outputs = []
        return [merge_outputs([outs[i] for outs in per_chunk]) for i in range(len(per_chunk[0]))]

    def _chunk_inputs(self, batch: dict) -> dict:
        """What every chunk is given (`ModelChunk.forward`'s keywords) from a batch, on this rank's device:
        input ids, labels, and document ids where the loader adds them (`data.document_mask`)."""
        return {k: batch[k].to(self.mesh.device) for k in CHUNK_INPUTS if batch.get(k) is not None}

    def train(self, micro_batches: list[dict], autocast: Callable[[], contextlib.AbstractContextManager],
              poison: bool = False) -> list:
        """Forward and backward of every micro-batch (gradients of their mean accumulate into `.grad`); returns
        this rank's partial outputs per micro-batch (`train.model.stage.merge_outputs`). `poison`: a NaN loss."""
        self.loss_fn.poisoned = poison
        if len(micro_batches) != self.micro_batches:
            raise ValueError(f"the pipeline was built for {self.micro_batches} micro-batches per step, got "
                             f"{len(micro_batches)}")
        kwargs = self._chunk_inputs({k: torch.cat([mb[k] for mb in micro_batches]) for k in CHUNK_INPUTS
                                     if micro_batches[0].get(k) is not None})
        ids = kwargs["input_ids"]
        first = any(chunk.first for _, chunk in self.split.chunks)
        args = (ids,) if first else ()
        with autocast():
            self.schedule.step(*args, target=kwargs["labels"] if self.holds_last else None,
                               return_outputs=False, **kwargs)
        return self._drain()

    @torch.no_grad()
    def evaluate(self, micro_batch: dict, autocast) -> Optional[torch.Tensor]:
        """Forward only of one micro-batch, chunk by chunk along the pipeline (blocking sends over the pipeline
        group); returns the lm_loss on the rank of the last chunk, None elsewhere."""
        device, n, P = self.mesh.device, self.split.num_chunks, self.mesh.pp_size
        kwargs = self._chunk_inputs(micro_batch)
        ids = kwargs["input_ids"]
        ranks = self.mesh.pp_group_ranks()
        mine = dict(self.split.chunks)
        h = None
        lm_loss = None
        for c in range(n):
            if c % P != self.mesh.pp_rank:
                continue
            chunk = mine[c]
            if c == 0:
                x = ids
            else:
                x = torch.empty(ids.shape + (self.cfg.model.d_model,), dtype=self.hidden_dtype, device=device)
                if (c - 1) % P == self.mesh.pp_rank:
                    x = h
                else:
                    dist.recv(x, src=ranks[(c - 1) % P])
            with autocast():
                h = chunk(x, **kwargs)
            if c < n - 1 and (c + 1) % P != self.mesh.pp_rank:
                dist.send(h.contiguous(), dst=ranks[(c + 1) % P])
            if chunk.last:
                lm_loss = chunk.outputs[-1].lm_loss
        for _, chunk in self.split.chunks:
            chunk.outputs = []
        return lm_loss


class PipelineEngine(LocalEngine):
    """Stage 0 (plain data parallelism) within each pipeline stage; see the module docstring. `runner` runs the
    schedule; `backward` is not used (the schedule runs backward itself)."""

    def __init__(self, model: nn.Module, optimizer, mesh: Mesh, runner: PipelineRunner, grad_clip: float,
                 bucket_mb: float):
        super().__init__(model, optimizer, mesh, runner.micro_batches, grad_clip, bucket_mb=bucket_mb)
        self.runner = runner
        self.partitioned = isinstance(optimizer, PartitionedOptimizer)
        self.copies = runner.split.copies
        self.embedding_group = mesh.embed_group if runner.split.shares_embedding else None

    def backward(self, loss: torch.Tensor) -> None:
        raise RuntimeError("a pipeline's backward runs inside its schedule (PipelineRunner.train)")

    def _sum_embedding_copies(self) -> None:
        """The first stage's embedding and the last stage's copy get the sum of their two gradients."""
        if self.embedding_group is None:
            return
        p = dict(self.model.named_parameters())[EMBEDDING]
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=self.embedding_group)

    def step(self) -> StepOutcome:
        reduce_gradients(self.model, self.mesh, self.bucket_bytes)
        self._sum_embedding_copies()
        return self._update(float(clip_grad_norm_(self.model, self.max_norm, self.mesh, self.copies)))

    def export_state(self):
        if self.partitioned:
            return self.optimizer.export_state()
        return super().export_state()

    def import_state(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        if self.partitioned:
            self.optimizer.import_state(states)
        else:
            super().import_state(states)


def build_pipeline_engine(model: nn.Module, param_groups: list[dict], optimizer_cls, cfg, mesh: Mesh,
                          split: PipelineSplit, accum_steps: int, hidden_dtype: torch.dtype) -> PipelineEngine:
    """The engine of a pipeline stage: its schedule over `accum_steps` micro-batches per step, and its optimizer
    over this rank's share: whole at `parallel.zero_stage=0`, partitioned over the stage's data-parallel ranks at
    1 (`parallel.zero1`); 2 and 3 are refused by the config's own rules."""
    if cfg.parallel.zero_stage not in (0, 1):
        raise ValueError(f"parallel.zero_stage={cfg.parallel.zero_stage} with parallel.pp_size={cfg.parallel.pp_size}"
                         f": pipelines run ZeRO 0 or 1")
    runner = PipelineRunner(split, cfg, mesh, accum_steps, hidden_dtype)
    optimizer = (PartitionedOptimizer(model, param_groups, optimizer_cls, mesh) if cfg.parallel.zero_stage == 1
                 else optimizer_cls(param_groups))
    return PipelineEngine(model, optimizer, mesh, runner, cfg.optim.grad_clip, bucket_mb=cfg.parallel.bucket_mb)
