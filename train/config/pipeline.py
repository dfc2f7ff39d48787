"""Pipeline parallelism's rules that need the model or the world size, and the one place the stage split and the
micro-batch count are derived (`ParallelConfig._validate_pipeline` has the layout's own rules).

Ranks: world = pp_size x (world / pp_size); each stage's world / pp_size ranks hold one copy of the stage and
split it by expert (`ep_size`) and data parallelism exactly as a whole model is split today. A step runs
m = global_batch / (micro_batch x world / pp_size) micro-batches through each pipeline.

Execution is `parallel/pipeline.py`'s; `refuse_pipeline` names what a pipelined start cannot run (compile, the
zero-bubble schedule with selective checkpointing).
"""
from __future__ import annotations

from train.config.errors import check

PIPELINE_COMPILE = ("trainer.compile=true with parallel.pp_size={pp}: the pipeline's stages run uncompiled; use "
                    "trainer.compile=false or parallel.pp_size=1")


def num_chunks(par) -> int:
    """Model chunks in the pipeline: pp_size x pp_virtual_stages (chunk c runs on stage rank c % pp_size)."""
    return par.pp_size * par.pp_virtual_stages


def even_layout(num_layers: int, chunks: int) -> list[int]:
    """`num_layers` over `chunks` as evenly as whole layers allow, the extra layers on the middle chunks first (the
    first holds the embedding, the last the head and MTP modules): a starting point for `parallel.pp_layout`."""
    base, extra = divmod(num_layers, chunks)
    order = list(range(1, chunks - 1)) + [0, chunks - 1] if chunks > 2 else list(range(chunks))
    out = [base] * chunks
    for c in order[:extra]:
        out[c] += 1
    return out


def stage_layout(cfg) -> list[int]:
    """Transformer layers per chunk, in pipeline order: `parallel.pp_layout`, or the even split."""
    par = cfg.parallel
    if par.pp_layout is not None:
        return list(par.pp_layout)
    return [cfg.model.num_layers // num_chunks(par)] * num_chunks(par)


def dp_size(cfg, world_size: int) -> int:
    """Data-parallel replicas of each stage (what the batch is split over)."""
    return world_size // cfg.parallel.pp_size


def check_pipeline(cfg, world_size: int) -> None:
    """`ConfigError` naming the fields when the pipeline cannot be laid out on `world_size` ranks (no-op at
    pp_size=1): the world splits into stages, ep_size divides a stage's ranks, the layers split into the chunks,
    and the step has at least as many micro-batches as the schedule needs."""
    par, t, L = cfg.parallel, cfg.trainer, cfg.model.num_layers
    P, v = par.pp_size, par.pp_virtual_stages
    if P == 1:
        return
    check(world_size % P == 0,
          f"parallel.pp_size={P} does not divide the world size {world_size}: each stage needs the same number of "
          f"ranks")
    stage_ranks = world_size // P
    check(stage_ranks % par.ep_size == 0,
          f"parallel.ep_size={par.ep_size} does not divide the {stage_ranks} ranks of a stage (world {world_size} / "
          f"parallel.pp_size={P}): pick an ep_size that divides {stage_ranks}")
    n = num_chunks(par)
    if par.pp_layout is None:
        check(L % n == 0,
              f"model.num_layers={L} does not divide into parallel.pp_size x parallel.pp_virtual_stages = {P} x {v}"
              f" = {n} chunks: set parallel.pp_layout (layers per chunk, summing to {L}), e.g. "
              f"parallel.pp_layout=[{','.join(map(str, even_layout(L, n)))}], or another pp_size")
    else:
        check(sum(par.pp_layout) == L,
              f"parallel.pp_layout={list(par.pp_layout)} sums to {sum(par.pp_layout)} layers, but "
              f"model.num_layers={L}: the chunks must hold every layer once")
    G, b = t.global_batch_size, t.micro_batch_size
    dp = stage_ranks
    check(G % (b * dp) == 0,
          f"trainer.global_batch_size={G} must be divisible by the data-parallel size (world / parallel.pp_size = "
          f"{dp}) x trainer.micro_batch_size={b} = {dp * b}")
    m = G // (b * dp)
    check(m >= P, f"trainer.global_batch_size={G} gives {m} micro-batches per pipeline (/ ({dp} replicas x "
                  f"trainer.micro_batch_size={b})), fewer than parallel.pp_size={P} stages: the schedule needs at "
                  f"least {P}; raise trainer.global_batch_size to {P * b * dp} or more")
    if par.pp_schedule == "interleaved_1f1b":  # Megatron's interleaved schedule runs micro-batches in groups of P
        check(m % P == 0, f"parallel.pp_schedule=interleaved_1f1b runs micro-batches in groups of parallel.pp_size="
                          f"{P}, and trainer.global_batch_size={G} gives {m}: use a multiple of {P * b * dp}")


def num_micro_batches(cfg, world_size: int) -> int:
    """Micro-batches per step of each pipeline (of each rank when pp_size = 1): the accumulation count."""
    t = cfg.trainer
    return max(1, t.global_batch_size // (t.micro_batch_size * dp_size(cfg, world_size)))


ZERO_BUBBLE_SELECTIVE = ("parallel.pp_schedule=zero_bubble with trainer.activation_checkpointing=selective: the "
                         "schedule runs backward twice over each region (input, then weight gradients) and torch's "
                         "selective checkpointing allows one; use trainer.activation_checkpointing=full or none, or "
                         "parallel.pp_schedule=1f1b")


def refuse_pipeline(cfg) -> None:
    """What a pipeline training start (and `trainer.dry_run`) cannot run: one line saying so."""
    if cfg.parallel.pp_size == 1:
        return
    check(not cfg.trainer.compile, PIPELINE_COMPILE.format(pp=cfg.parallel.pp_size))
    check(not (cfg.parallel.pp_schedule == "zero_bubble" and cfg.trainer.activation_checkpointing == "selective"),
          ZERO_BUBBLE_SELECTIVE)
