"""The smallest layout of a model that fits a device, by planning every candidate (`plan_memory`).

Search space (the README's fit table uses the defaults): world sizes in whole nodes of `gpus_per_node`, up to
`max_world`; `ep_size` among the divisors of the routed-expert count that also divide the world; ZeRO stages
1, 2 and 3; the micro-batch, sequence length, precision and checkpointing mode given (1 x 4096, bf16, full).
Among the layouts that fit at the smallest world size, the lowest ZeRO stage wins (least communication), then
the lowest peak.
"""
from __future__ import annotations

from dataclasses import replace

from parallel.mesh import validate_parallel_config
from train.config import TrainConfig, load_train_config
from train.plan.planner import plan_memory

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
