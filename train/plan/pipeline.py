"""The pipeline's stages and schedule, by arithmetic: which layers each stage rank holds, how many micro-batches'
activations it keeps at its peak, and the bubble.

Stages: `parallel.pp_size` = P ranks, each holding `parallel.pp_virtual_stages` = v chunks of consecutive layers
(chunk c on rank c mod P; `train.config.pipeline.stage_layout`); the embedding goes with the first chunk, the final
norm, the output head and the MTP modules with the last (which sits on rank P-1). MTP reads the shared embedding:
the last stage holds a copy of it, as Megatron keeps a tied embedding on both ends, its gradient summed between the
two.

What a rank keeps alive, and when: the order in which torch.distributed.pipelining (2.13) runs each rank's forward
(F), backward (B) or input-gradient (I) and weight-gradient (W) passes (`rank_ops`, re-derived from its
`Schedule1F1B` and `_get_1f1b_rank_ops`, checked against torch's own tables in tests/unit/test_plan_pipeline.py):
  1f1b (`Schedule1F1B`, one chunk a rank): P - i - 1 warm-up forwards, then one forward and one backward in turn
    (Narayanan et al. 2021, PipeDream-Flush): P - i micro-batches alive at the peak;
  interleaved_1f1b (`ScheduleInterleaved1F1B`, v chunks a rank, micro-batches in rounds of r = m / max(1, m // P)):
    (v - 1)·r + 2·(P - i - 1) warm-up chunk forwards, then 1F1B, forwards walking the chunks up and backwards down
    a round at a time;
  zero_bubble (`ScheduleInterleavedZeroBubble`, torch's ZB1P, i.e. ZB-H1 of Qi et al. 2024, not ZB-H2):
    (v - 1)·r + (P - i - 1) warm-up forwards, then F, I and, from the (i+1)-th on, the W of the oldest pending I.
    A micro-batch's saved tensors live from its F until its W (I keeps the graph for W), so with v = 1 every rank
    keeps P micro-batches (ZB-H1's promise: 1F1B's first-stage memory on every stage). On the first stage torch
    skips I and its W runs the whole backward.
A micro-batch's activations on a chunk live from its F until its B (W with zero_bubble); a rank's peak is the most,
over its op sequence, of the chunks' live micro-batches weighed by each chunk's activations (`peak_in_flight`).
Besides, torch's `PipelineStage` allocates one receive buffer per micro-batch of the step for the activation every
non-first chunk receives and the gradient every non-last chunk receives, held from the first step on
(`_setup_forward_recv_info`, `_setup_backward_recv_info`): `recv_buffers`.

Bubble, the idle fraction of a step: simulated over the ops of all ranks (`bubble_fraction`), each op starting when
its rank is free and its input is there (F after the previous chunk's F of the micro-batch, B or I after the next
chunk's), with ZB's equal times F = I = W = 1, B = I + W = 2, and sends taking no time. For 1f1b this is
(P - 1)/(m + P - 1); for interleaved about (P - 1)/(v·m + P - 1); for torch's ZB1P about a third of 1F1B's. 0 with
one stage.
"""
from __future__ import annotations

from dataclasses import dataclass

from train.config.pipeline import stage_layout


@dataclass(frozen=True)
class Stage:
    """One pipeline rank: its main-model layers (all its chunks; `chunk_layers` per chunk, in local order), whether
    it holds the embedding (`first`) and the final norm, head and MTP modules (`last`), and the micro-batches of its
    activations alive at its peak (`in_flight`, in whole-rank units: the chunks' live counts over v)."""

    rank: int
    layers: tuple[int, ...]
    first: bool
    last: bool
    in_flight: float
    chunks: int = 1
    chunk_layers: tuple[tuple[int, ...], ...] = ()
    ops: tuple[tuple[str, int, int], ...] = ()  # (F | B | I | W, local chunk, micro-batch), in run order


def schedule_kind(schedule: str, v: int) -> str:
    """Which torch schedule runs (`parallel.pipeline._schedule_class`): 1f1b with v > 1 is the interleaved one."""
    return "interleaved_1f1b" if schedule == "1f1b" and v > 1 else schedule


def rank_ops(schedule: str, P: int, v: int, m: int, i: int) -> list[tuple[str, int, int]]:
    """Pipeline rank `i`'s compute ops in the order torch runs them (module docstring): (kind, local chunk j,
    micro-batch); chunk j of rank i is the model's chunk j·P + i."""
    schedule = schedule_kind(schedule, v)
    if schedule == "1f1b":
        warm = min(P - 1 - i, m)
        ops = [("F", 0, k) for k in range(warm)]
        for k in range(warm, m):
            ops += [("F", 0, k), ("B", 0, k - warm)]
        return ops + [("B", 0, k) for k in range(m - warm, m)]
    zb = schedule == "zero_bubble"
    r = m // max(1, m // P)  # micro-batches a round
    warm = min((v - 1) * r + (1 if zb else 2) * (P - 1 - i), m * v)
    total = m * v
    back = "I" if zb else "B"
    fwd_mb, bwd_mb, w_mb = [0] * v, [0] * v, [0] * v
    pending: list[int] = []  # chunks of the I ops whose W is still to run, oldest first
    ops: list[tuple[str, int, int]] = []

    def emit(kind: str, j: int, counter: list) -> None:
        ops.append((kind, j, counter[j]))
        counter[j] += 1

    for k in range(total + warm):
        if k < total:
            emit("F", (k // r) % v, fwd_mb)
        if k >= warm:
            j = v - 1 - ((k - warm) // r) % v
            emit(back, j, bwd_mb)
            pending.append(j)
            if zb and k - warm >= i:
                emit("W", pending.pop(0), w_mb)
    while zb and pending:
        emit("W", pending.pop(0), w_mb)
    return ops


def peak_in_flight(ops, weights) -> tuple[float, list[int]]:
    """The most of Σ_j live_j·weights[j] over the op sequence, live_j the micro-batches chunk j holds (from F
    until B, or W after an I), and the live counts at that peak."""
    release = "W" if any(kind == "W" for kind, _, _ in ops) else "B"
    live = [0] * len(weights)
    best, at = 0.0, list(live)
    for kind, j, _ in ops:
        if kind == "F":
            live[j] += 1
            total = sum(n * w for n, w in zip(live, weights))
            if total > best:
                best, at = total, list(live)
        elif kind == release:
            live[j] -= 1
    return best, at


def in_flight(schedule: str, P: int, v: int, m: int, i: int) -> float:
    """Micro-batches of stage rank `i`'s activations alive at its peak, in whole-rank units (equal chunks)."""
    if P == 1:
        return 1.0
    return peak_in_flight(rank_ops(schedule, P, v, m, i), [1.0 / v] * v)[0]


EQUAL_COSTS = {"F": 1.0, "B": 2.0, "I": 1.0, "W": 1.0}  # ZB's T_F = T_B(input) = T_W; a full backward is both


def bubble_fraction(schedule: str, P: int, v: int, m: int, cost: dict | None = None) -> float:
    """The idle fraction of a step, simulated (module docstring) with each op's time from `cost` (F, B, I, W: one
    dict for every rank, or a list of one per rank; default `EQUAL_COSTS`), the worst rank's."""
    if P == 1:
        return 0.0
    n = P * v
    ops = [rank_ops(schedule, P, v, m, i) for i in range(P)]
    costs = [cost or EQUAL_COSTS] * P if not isinstance(cost, list) else cost
    end: dict = {}  # (kind, global chunk, micro-batch) -> finish time
    pos, free = [0] * P, [0.0] * P
    busy = [0.0] * P
    while any(pos[i] < len(ops[i]) for i in range(P)):
        progressed = False
        for i in range(P):
            while pos[i] < len(ops[i]):
                kind, j, k = ops[i][pos[i]]
                c = j * P + i
                dur = costs[i][kind]
                if c == 0 and kind in ("I", "W"):  # the first stage skips I; its W is the whole backward
                    dur = 0.0 if kind == "I" else costs[i]["I"] + costs[i]["W"]
                dep = None  # the op whose output this one needs: the same kind, one chunk up or down the pipeline
                if kind == "F" and c > 0:
                    dep = ("F", c - 1, k)
                elif kind in ("B", "I") and c < n - 1:
                    dep = (kind, c + 1, k)
                if dep is not None and dep not in end:
                    break
                start = max(free[i], end[dep] if dep else 0.0)
                free[i] = end[(kind, c, k)] = start + dur
                busy[i] += dur
                pos[i] += 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"pipeline schedule {schedule} (P={P}, v={v}, m={m}) does not progress")
    return 1.0 - min(busy) / max(free)


def stages(cfg, num_micro_batches: int) -> list[Stage]:
    """The P stage ranks of `cfg`'s pipeline (one stage holding everything when pp_size = 1)."""
    par = cfg.parallel
    P, v = par.pp_size, par.pp_virtual_stages
    layout = stage_layout(cfg)
    chunks: list[list[tuple[int, ...]]] = [[] for _ in range(P)]
    start = 0
    for c, n in enumerate(layout):
        chunks[c % P].append(tuple(range(start, start + n)))
        start += n
    last_rank = (len(layout) - 1) % P
    return [Stage(i, tuple(x for ch in chunks[i] for x in ch), i == 0, i == last_rank,
                  in_flight(par.pp_schedule, P, v, num_micro_batches, i), v, tuple(chunks[i]),
                  tuple(rank_ops(par.pp_schedule, P, v, num_micro_batches, i)) if P > 1 else ())
            for i in range(P)]


def stage_units(cfg, stage: Stage) -> set[str]:
    """Top-level modules of the stage, as `train.plan.planner.unit_of` names them."""
    units = {f"layers.{i}" for i in stage.layers}
    if stage.first:
        units.add("embed")
    if stage.last:
        units |= {"head", *(f"mtp.{k}" for k in range(cfg.model.mtp_depth))}
        if cfg.model.mtp_depth or cfg.model.tie_embeddings:  # MTP (and a tied head) read the embedding's weight
            units.add("embed")
    return units


def stage_blocks(cfg, stage: Stage) -> list[int]:
    """Indices into `activation_bytes(...)["per_block"]` (main layers, then MTP blocks) of the stage's blocks."""
    mtp = range(cfg.model.num_layers, cfg.model.num_layers + cfg.model.mtp_depth) if stage.last else ()
    return [*stage.layers, *mtp]
