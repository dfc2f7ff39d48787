"""The smallest layout of a model that fits a device, and the fastest that fits a given cluster, by planning every
candidate (`plan_memory`, `estimate_step_time`).

Search space (the README's fit table uses the defaults): world sizes in whole nodes of `gpus_per_node`, up to
`max_world`; `ep_size` among the divisors of the routed-expert count that also divide the world; ZeRO stages
1, 2 and 3; the micro-batch, sequence length, precision and checkpointing mode given (1 x 4096, bf16, full).
Among the layouts that fit at the smallest world size, the lowest ZeRO stage wins (least communication), then
the lowest peak.

`fastest_fitting_layout` searches one world size: pp_size among the powers of two up to the layer count (1F1B;
the layers split evenly where they divide, else by per-layer cost, `balanced_layout`), ep_size as above but
dividing a stage's ranks, ZeRO 0-3 (0-1 with a pipeline), and the checkpointing modes given; the layout with the
lowest estimated step time among those that fit wins (ties: the lower peak).
"""
from __future__ import annotations

from dataclasses import replace

from parallel.mesh import validate_parallel_config
from train.config import TrainConfig, load_train_config
from train.config.errors import ConfigError
from train.config.pipeline import check_pipeline
from train.plan.planner import plan_memory
from train.plan.time import Hardware, balanced_layout, estimate_step_time

STAGES = (1, 2, 3)


def layout_config(model: str, micro_batch: int = 1, seq_len: int = 4096, precision: str = "bf16",
                  checkpointing: str = "full") -> TrainConfig:
    return load_train_config([f"model={model}", f"trainer.micro_batch_size={micro_batch}",
                              f"trainer.seq_len={seq_len}", f"precision={precision}",
                              f"trainer.activation_checkpointing={checkpointing}"])


def smallest_fitting_layout(cfg: TrainConfig, device_memory: int, headroom: float = 0.1, gpus_per_node: int = 8,
                            max_world: int = 4096) -> dict | None:
    """The plan of the smallest layout of `cfg` (its micro-batch, precision and checkpointing) that fits (see the
    module docstring), or None up to `max_world` ranks."""
    num_experts = cfg.model.moe.num_routed_experts
    eps = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
    for world in range(gpus_per_node, max_world + 1, gpus_per_node):
        if world < 2:  # ZeRO partitions over several ranks
            continue
        fitting = []
        for stage in STAGES:
            for ep in (d for d in eps if world % d == 0):
                c = replace(cfg, parallel=replace(cfg.parallel, ep_size=ep, zero_stage=stage))
                validate_parallel_config(c, world)
                plan = plan_memory(c, world, device_memory, headroom)
                if plan["fits"]:
                    fitting.append(plan)
            if fitting:
                return min(fitting, key=lambda p: p["peak_bytes"])
    return None


def _pipeline_candidates(cfg: TrainConfig, world: int):
    """(pp_size, layout or None) worth planning on `world` ranks."""
    L = cfg.model.num_layers
    pp = 1
    while pp <= min(L, world):
        if world % pp == 0:
            yield pp, (None if L % pp == 0 else balanced_layout(cfg, pp))
        pp *= 2


def fastest_fitting_layout(cfg: TrainConfig, world: int, device_memory: int, headroom: float = 0.1,
                           hw: Hardware = Hardware(), modes=("full", "selective", "none")) -> dict | None:
    """The plan (memory and step time) of the fastest layout of `cfg` on `world` ranks that fits (module
    docstring), at `cfg`'s micro-batch, sequence length, precision and global batch; None when none fits."""
    num_experts = cfg.model.moe.num_routed_experts
    best = None
    for pp, layout in _pipeline_candidates(cfg, world):
        schedule = dict(pp_size=pp, pp_layout=layout)
        for ep in (d for d in range(1, num_experts + 1) if num_experts % d == 0 and (world // pp) % d == 0):
            for stage in ((0, 1, 2, 3) if pp == 1 else (0, 1)):
                for mode in modes:
                    c = replace(cfg, parallel=replace(cfg.parallel, ep_size=ep, zero_stage=stage, **schedule),
                                trainer=replace(cfg.trainer, activation_checkpointing=mode))
                    try:
                        check_pipeline(c, world)
                        validate_parallel_config(c, world)
                    except (ConfigError, ValueError):
                        continue
                    plan = plan_memory(c, world, device_memory, headroom)
                    if not plan["fits"]:
                        continue
                    plan.update(estimate_step_time(c, world, plan, hw))
                    if best is None or (plan["step_time_s"], plan["peak_bytes"]) < (best["step_time_s"],
                                                                                      best["peak_bytes"]):
                        best = plan
    return best
