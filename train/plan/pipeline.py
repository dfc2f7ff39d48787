"""The pipeline's stages and schedule, by arithmetic: which layers each stage rank holds, how many micro-batches'
activations it keeps at its peak, and the bubble.

Stages: `parallel.pp_size` = P ranks, each holding `parallel.pp_virtual_stages` = v chunks of consecutive layers
(chunk c on rank c mod P; `train.config.pipeline.stage_layout`); the embedding goes with the first chunk, the final
norm, the output head and the MTP modules with the last (which sits on rank P-1). MTP reads the shared embedding:
the last stage holds a copy of it, as Megatron keeps a tied embedding on both ends, its gradient summed between the
two.

Micro-batches in flight at a stage's peak (m micro-batches per step, stage rank i = 0..P-1), each worth one
micro-batch of the activations of the rank's layers:
  1f1b: min(P - i, m) (Narayanan et al. 2021, PipeDream-Flush: P - i - 1 warm-up forwards, then one more before
    each backward);
  interleaved_1f1b: min(((v - 1)·P + 2·(P - i - 1) + 1) / v, m): Megatron-LM's interleaved schedule runs
    (v - 1)·P + 2·(P - i - 1) warm-up chunk forwards and one more in the steady state, each chunk 1/v of the rank's
    layers; for i = 0 that is P·(1 + (P - 1)/(P·v)), Korthikanti et al. 2022 §4.2.3;
  zero_bubble: min(2·(P - i) - 1, m): ZB-H2 (Qi et al. 2024, "Zero Bubble Pipeline Parallelism", Table 1: peak
    (2P - 1) micro-batches against 1F1B's P), whose extra warm-up forwards fill the bubble.
A rank's parts are all counted at its own in-flight count (for interleaved, the head's chunk is over-counted).

Bubble, the idle fraction of a step: (P - 1)/(m + P - 1) for 1f1b; (P - 1)/(v·m + P - 1) for interleaved_1f1b (the
fill and drain shrink v-fold); 0 for zero_bubble (ZB-H2 with m >= P, the paper's equal F, B and W times: what is
left is its memory cost above). 0 with one stage.
"""
from __future__ import annotations

from dataclasses import dataclass

from train.config.pipeline import stage_layout


@dataclass(frozen=True)
class Stage:
    """One pipeline rank: its main-model layers (all its chunks), whether it holds the embedding (`first`) and the
    final norm, head and MTP modules (`last`), and the micro-batches of activations it keeps at its peak."""

    rank: int
    layers: tuple[int, ...]
    first: bool
    last: bool
    in_flight: float
    chunks: int = 1


def in_flight(schedule: str, P: int, v: int, m: int, i: int) -> float:
    """Micro-batches of stage rank `i`'s activations alive at its peak (module docstring)."""
    if P == 1:
        return 1.0
    if schedule == "interleaved_1f1b":
        return min(((v - 1) * P + 2 * (P - i - 1) + 1) / v, float(m))
    if schedule == "zero_bubble":
        return float(min(2 * (P - i) - 1, m))
    return float(min(P - i, m))


def bubble_fraction(schedule: str, P: int, v: int, m: int) -> float:
    """The idle fraction of a step (module docstring)."""
    if P == 1 or schedule == "zero_bubble":
        return 0.0
    if schedule == "interleaved_1f1b":
        return (P - 1) / (v * m + P - 1)
    return (P - 1) / (m + P - 1)


def stages(cfg, num_micro_batches: int) -> list[Stage]:
    """The P stage ranks of `cfg`'s pipeline (one stage holding everything when pp_size = 1)."""
    par = cfg.parallel
    P, v = par.pp_size, par.pp_virtual_stages
    layout = stage_layout(cfg)
    layers: list[list[int]] = [[] for _ in range(P)]
    start = 0
    for c, n in enumerate(layout):
        layers[c % P].extend(range(start, start + n))
        start += n
    last_rank = (len(layout) - 1) % P
    return [Stage(i, tuple(layers[i]), i == 0, i == last_rank,
                  in_flight(par.pp_schedule, P, v, num_micro_batches, i), v) for i in range(P)]


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
