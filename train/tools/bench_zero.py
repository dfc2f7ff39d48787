"""Per-rank memory and step time of DeepSpeed ZeRO stages 1-3 against moeforge's own stage 0, on the same model,
weights and batches.

    torchrun --nproc_per_node=4 scripts/bench_zero.py [--steps 5] [hydra overrides]

Defaults: tiny_deepseek_moe with ep_size=2 (each expert on 2 of the 4 ranks), 2 micro-batches of 2 sequences of
128 tokens per rank and step, AdamW, fp32. For each stage it prints the bytes this rank holds (parameters;
gradients while accumulating and once reduced; optimizer moments plus any fp32 master copy), measured from the
tensors themselves (`TrainEngine.held_bytes`), and the mean wall time of a training step after one warm-up
step, relative to stage 0, and the bytes DeepSpeed all-gathers on this rank per step, by dtype (ZeRO-1/2: the
updated parameters after the step; ZeRO-3: every parameter around each use, and those). ZeRO-3 runs with `stage3_param_persistence_threshold=0` so that small tensors are
partitioned too (DeepSpeed keeps tensors under 1e5 elements whole by default, which is all of a tiny model's).
Beside each measured figure it prints the memory planner's (`python -m train.plan`, from the config alone; its
gradient figure is the worst rank's while accumulating), and at stage 0 the bytes saved for backward by one
micro-batch's forward through the all-to-all dispatcher (saved-tensor hooks) against the planner's activations.
Rank 0's last line is JSON with every figure.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time


import torch

DEFAULTS = ["model=tiny_deepseek_moe", "parallel.ep_size=2", "trainer.micro_batch_size=2", "trainer.seq_len=128",
            "optim.schedule=constant", "optim.warmup_steps=0"]


def micro_batches(cfg, mesh, accum: int, step: int) -> list[dict]:
    t = cfg.trainer
    g = torch.Generator().manual_seed(1000 * step + mesh.rank)
    ids = torch.randint(0, cfg.model.vocab_size, (accum, t.micro_batch_size, t.seq_len + 1), generator=g)
    return [{"input_ids": x[:, :-1], "labels": x[:, 1:]} for x in ids]


def run_stage(stage: int, overrides: list[str], steps: int) -> dict:
    from parallel import init_distributed
    from parallel.zero.runtime import count_gathered_bytes
    from train.build import EngineArgs, build_model
    from train.config import load_train_config
    from train.data import check_batch_sizes
    from train.plan import plan_memory
    from train.plan.measure import saved_tensor_bytes
    from train.precision import build_precision
    from train.trainer.schedule import LRSchedule
    from train.trainer.state import TrainState
    from train.trainer.step import StepContext, train_step

    extra = ["+parallel.deepspeed.zero_optimization.stage3_param_persistence_threshold=0"] if stage == 3 else []
    cfg = load_train_config([*DEFAULTS, *overrides, f"parallel.zero_stage={stage}", *extra])
    mesh = init_distributed(cfg)
    accum = check_batch_sizes(cfg.trainer, mesh.world_size)
    torch.manual_seed(cfg.trainer.seed)
    built = build_model(cfg, mesh, init_seed=cfg.trainer.seed, engine_args=EngineArgs(accum))
    model, engine = built.model, built.engine
    schedule = LRSchedule(cfg.optim, steps + 1)
    state = TrainState(model=model, engine=engine, scheduler=schedule, data=None)
    ctx = StepContext(precision=build_precision(cfg.precision, mesh.device), schedule=schedule, mesh=mesh,
                      tokens_per_step=0)

    first, *rest = micro_batches(cfg, mesh, accum, 0)  # memory, measured inside one step
    saved = saved_tensor_bytes(model, first["input_ids"], first["labels"]) if stage == 0 else None
    engine.backward(engine.forward(first["input_ids"], first["labels"]).loss)
    accumulating = engine.held_bytes()["grads"]
    for mb in rest:
        engine.backward(engine.forward(mb["input_ids"], mb["labels"]).loss)
    reduced = engine.held_bytes()["grads"]
    engine.step()
    state.step = 1
    held = engine.held_bytes()

    times = []
    with count_gathered_bytes() if stage else contextlib.nullcontext({}) as gathered:
        for s in range(steps):
            batches = micro_batches(cfg, mesh, accum, s + 1)
            start = time.perf_counter()
            train_step(state, batches, ctx)
            times.append(time.perf_counter() - start)
    plan = plan_memory(cfg, mesh.world_size)
    return {"params_bytes": held["params"], "grads_accumulating_bytes": accumulating, "grads_reduced_bytes": reduced,
            "optimizer_bytes": held["optimizer"], "step_s": sum(times) / len(times), "rank": mesh.rank,
            "gathered_bytes_per_step": {dtype: n // steps for dtype, n in gathered.items()},
            "world_size": mesh.world_size, "saved_activation_bytes": saved,
            "planned": {k: plan[k] for k in ("params_bytes", "grads_bytes", "grads_partition_bytes",
                                             "optimizer_bytes", "activations_bytes")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    args, overrides = parser.parse_known_args()
    results = {stage: run_stage(stage, overrides, args.steps) for stage in (0, 1, 2, 3)}
    if results[0]["rank"] != 0:
        return
    base = results[0]
    print(f"world {base['world_size']}, rank 0, overrides {[*DEFAULTS, *overrides]}")
    print("stage  params_B  grads_accum_B  grads_reduced_B  optimizer_B  step_s  vs_stage0  gathered_B/step")
    for stage, r in results.items():
        r["step_time_vs_stage0"] = r["step_s"] / base["step_s"]
        gathered = " ".join(f"{n} {dtype}" for dtype, n in sorted(r["gathered_bytes_per_step"].items())) or "-"
        print(f"{stage:>5}  {r['params_bytes']:>8}  {r['grads_accumulating_bytes']:>13}  "
              f"{r['grads_reduced_bytes']:>15}  {r['optimizer_bytes']:>11}  {r['step_s']:.3f}  "
              f"{r['step_time_vs_stage0']:>9.2f}  {gathered}")
    print("planned (python -m train.plan; grads = worst rank while accumulating), planned / measured:")
    for stage, r in results.items():
        p = r["planned"]
        print(f"{stage:>5}  {p['params_bytes']:>8} {p['params_bytes'] / r['params_bytes']:.3f}  "
              f"{p['grads_bytes']:>13} {p['grads_bytes'] / r['grads_accumulating_bytes']:.3f}  "
              f"{p['grads_partition_bytes']:>15} {p['grads_partition_bytes'] / r['grads_reduced_bytes']:.3f}  "
              f"{p['optimizer_bytes']:>11} {p['optimizer_bytes'] / r['optimizer_bytes']:.3f}")
    planned, saved = base["planned"]["activations_bytes"], base["saved_activation_bytes"]
    print(f"activations of one micro-batch: measured {saved}, planned {planned} ({planned / saved:.3f})")
    print(json.dumps({f"stage{s}": r for s, r in results.items()}))

