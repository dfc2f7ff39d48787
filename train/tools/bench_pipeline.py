"""The pipeline's bubble on CPU, measured against the planner's (`train.plan.pipeline.bubble_fraction`).

    torchrun --standalone --nproc_per_node=2 scripts/bench_pipeline.py --schedule 1f1b --micro-batches 4
        [--steps 3] [hydra overrides]

Two ranks are one pipeline of two stages (pp 2, dp 1, ep 1), so each rank has a core to itself (OMP_NUM_THREADS=1).
Defaults: tiny_deepseek_v3 (4 layers: 2 a stage, or 1 a chunk with the interleaved schedule's 2 chunks a rank),
micro-batches of 2 x 128 tokens, fp32. Each rank times its compute inside the schedule: every call of its
stages' forward, backward, input-gradient and weight-gradient passes (`PipelineStage.forward_one_chunk`,
`backward_one_chunk`, `backward_weight_one_chunk`; wall clock, thread CPU time beside it), against the wall
time of the schedule's step (`PipelineRunner.train`, after a barrier; the optimizer step is outside), over
`--steps` steps after one warm-up step (medians). Bubble = 1 - busy / wall, per rank; the pipeline's is the worst rank's,
as the planner states it. Planned: with ZB's equal op times (F = I = W, B = I + W: what `python -m train.plan`
prints), and with each rank's pass times measured here (thread CPU seconds, mean F, B, I, W), which adds the
idle time of unequal passes and stages (the last stage has the head). The rest (measured above that) is what
the plan leaves out: sends and receives (gloo on one host), Python between the passes, and contention.
On a shared machine the wall times stretch when other processes take the cores (the script prints by how much:
wall over thread CPU time in the passes), unevenly between ranks, which shows as bubble: run it on idle cores.
Rank 0's last line is JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch
import torch.distributed as dist

DEFAULTS = ["model=tiny_deepseek_v3", "model.mtp_depth=0", "model.vocab_size=512", "data.tokenizer_vocab_size=512",
            "trainer.micro_batch_size=2", "trainer.seq_len=128", "trainer.device=cpu",
            "optim.schedule=constant", "optim.warmup_steps=0"]
PASSES = {"forward_one_chunk": "F", "backward_one_chunk": "B", "backward_weight_one_chunk": "W"}


class PassTimer:
    """Wall and thread CPU seconds spent in each stage's passes, by kind (F, B, I, W); a backward with
    `full_backward=False` is the input-gradient pass I (zero bubble)."""

    def __init__(self, stages):
        self.wall: dict[str, list[float]] = {k: [] for k in "FBIW"}
        self.cpu_by: dict[str, list[float]] = {k: [] for k in "FBIW"}
        for stage in stages:
            for name, kind in PASSES.items():
                setattr(stage, name, self._wrap(getattr(stage, name), kind, stage))

    def _wrap(self, fn, kind: str, stage):
        def timed(*args, **kwargs):
            k = "I" if kind == "B" and kwargs.get("full_backward", True) is False else kind
            start, cpu = time.perf_counter(), time.thread_time()
            out = fn(*args, **kwargs)
            self.wall[k].append(time.perf_counter() - start)
            self.cpu_by[k].append(time.thread_time() - cpu)
            return out
        return timed

    def reset(self) -> None:
        for times in (*self.wall.values(), *self.cpu_by.values()):
            times.clear()

    def busy(self) -> float:
        return sum(sum(t) for t in self.wall.values())

    @property
    def cpu(self) -> float:
        return sum(sum(t) for t in self.cpu_by.values())


def run(schedule: str, micro_batches: int, steps: int, overrides: list[str]) -> dict:
    from parallel import init_distributed
    from train.build import EngineArgs, build_model
    from train.config import load_train_config
    from train.plan.pipeline import bubble_fraction
    from train.tools.bench_zero import micro_batches as make_batches

    virtual = 2 if schedule == "interleaved_1f1b" else 1
    world = int(dist.get_world_size()) if dist.is_initialized() else 2
    cfg = load_train_config([*DEFAULTS, "parallel.pp_size=2", f"parallel.pp_schedule={schedule}",
                             f"parallel.pp_virtual_stages={virtual}", *overrides])
    mb = cfg.trainer.micro_batch_size
    cfg = load_train_config([*DEFAULTS, "parallel.pp_size=2", f"parallel.pp_schedule={schedule}",
                             f"parallel.pp_virtual_stages={virtual}",
                             f"trainer.global_batch_size={mb * micro_batches * world // 2}", *overrides])
    mesh = init_distributed(cfg)
    built = build_model(cfg, mesh, init_seed=cfg.trainer.seed, engine_args=EngineArgs(micro_batches))
    engine = built.engine
    timer = PassTimer(engine.runner.stages)
    rows = []
    for s in range(steps + 1):
        batches = make_batches(cfg, mesh, micro_batches, s)
        for b in batches:  # one pipeline: its two stages read the same micro-batches
            b["input_ids"], b["labels"] = b["input_ids"].clone(), b["labels"].clone()
        dist.barrier()
        timer.reset()
        start = time.perf_counter()
        engine.runner.train(batches, contextlib.nullcontext)
        wall = time.perf_counter() - start
        engine.step()
        rows.append({"wall": wall, "busy": timer.busy(), "cpu": timer.cpu,
                     "op_s": {k: statistics.mean(v) for k, v in timer.wall.items() if v},
                     "op_cpu_s": {k: statistics.mean(v) for k, v in timer.cpu_by.items() if v}})
    rows = rows[1:]
    wall = statistics.median(r["wall"] for r in rows)
    busy = statistics.median(r["busy"] for r in rows)
    mine = {"rank": mesh.rank, "wall_s": wall, "busy_s": busy, "busy_cpu_s": statistics.median(r["cpu"] for r in rows),
            "bubble": 1 - busy / wall,
            "op_s": {k: statistics.mean(r["op_s"][k] for r in rows) for k in rows[0]["op_s"]},
            "op_cpu_s": {k: statistics.mean(r["op_cpu_s"][k] for r in rows) for k in rows[0]["op_cpu_s"]}}
    everyone = [None] * mesh.world_size
    dist.all_gather_object(everyone, mine)
    costs = []  # each rank's pass times in thread CPU seconds: what they would take on cores of their own
    for r in everyone:
        cost = dict(r["op_cpu_s"])
        if "I" in cost or "W" in cost:  # zero bubble; torch skips the first stage's I (its W is the whole backward)
            cost.setdefault("I", 0.0)
            if r["rank"] == 0:
                cost["I"] = cost["W"] = cost["W"] / 2
            cost["B"] = cost["I"] + cost["W"]
        else:
            cost["I"] = cost["W"] = cost["B"] / 2
        costs.append(cost)
    P, v = cfg.parallel.pp_size, virtual
    return {"schedule": schedule, "micro_batches": micro_batches, "pp_size": P, "virtual_stages": v,
            "steps": steps, "bubble_measured": max(r["bubble"] for r in everyone),
            "bubble_measured_by_rank": [r["bubble"] for r in everyone],
            "bubble_planned": bubble_fraction(schedule, P, v, micro_batches),
            "bubble_planned_measured_op_times": bubble_fraction(schedule, P, v, micro_batches, costs),
            "op_cpu_ms_by_rank": [{k: 1e3 * t for k, t in c.items()} for c in costs], "ranks": everyone,
            "rank": mesh.rank}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schedule", choices=("1f1b", "interleaved_1f1b", "zero_bubble"), default="1f1b")
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    args, overrides = parser.parse_known_args()
    torch.set_num_threads(1)
    out = run(args.schedule, args.micro_batches, args.steps, overrides)
    if out.pop("rank") != 0:
        return
    for r in out["ranks"]:
        print(f"rank {r['rank']}: step {r['wall_s'] * 1e3:.1f} ms, busy {r['busy_s'] * 1e3:.1f} ms "
              f"(thread CPU {r['busy_cpu_s'] * 1e3:.1f} ms), bubble {r['bubble']:.1%}; per pass (ms) "
              + ", ".join(f"{k} {t * 1e3:.1f}" for k, t in r["op_s"].items()))
    stretch = max(r["busy_s"] / r["busy_cpu_s"] for r in out["ranks"])
    print(f"contention: a pass's wall time is up to {stretch:.1f}x its thread CPU time (1.0 on an idle machine)")
    print(f"{out['schedule']} P={out['pp_size']} v={out['virtual_stages']} m={out['micro_batches']}: bubble measured "
          f"{out['bubble_measured']:.1%} (worst rank), planned {out['bubble_planned']:.1%} (F = I = W), "
          f"{out['bubble_planned_measured_op_times']:.1%} with each rank's measured pass CPU times")
    print(json.dumps(out))
