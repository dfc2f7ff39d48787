"""The step-time model (`train.plan.time`) against measured training steps on gloo ranks: compute and
communication each as measured / planned.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=4 scripts/bench_plan_time.py [--steps 4]
        [--layouts ep4_z0,ep2_z1,ep1_z3] [--models tiny_mixtral,tiny_deepseek_v3] [hydra overrides]

The model's inputs are measured here, on these ranks at once and again before each layout (the machine's load
drifts):
- peak: an fp32 GEMM of `--gemm`^3, FLOP per CPU-second of this thread (the cores are time-shared, by these ranks
  and by other work: CPU time is the figure contention does not skew);
- all-to-all bandwidth: `all_to_all_single` of one dispatch's rows (tokens x d_model fp32), bytes each rank sends
  to the others per wall second;
- all-reduce bandwidth: `all_reduce` of 16 MB, as a ring's bus bandwidth (2·(n-1)/n · bytes / s); and the latency
  of a one-element all-reduce.
Then for each layout (ep_size, ZeRO stage; fp32, `parallel.overlap=false` so no collective hides behind compute,
ZeRO-3 with `stage3_param_persistence_threshold=0` so every tensor is gathered as the model assumes) it runs
`--steps` training steps after a warm-up, every `torch.distributed` collective wrapped (asynchronous ones run
synchronously: the model assumes no overlap). Measured per step: `compute`, the slowest rank's CPU seconds outside
collectives (routing, permutes and the optimizer step included: the model counts only FLOPs); `communication`,
the least-waiting rank's wall seconds inside collectives (transfers, latency, and waiting for slower ranks, which
the least-waiting rank does least); medians over steps. Planned: `estimate_step_time` with the measured peak at
efficiency 1, the all-to-all bandwidth for its all-to-all term and the all-reduce bandwidth for ZeRO's and the
data-parallel reduction (one node: every rank intra-node). The model has no latency term: the collectives per
step and the small all-reduce's latency are printed beside the ratios, and the ratio with calls x latency taken
off. Prints a markdown table, then JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist

_WRAPPED = ("all_reduce", "all_to_all_single", "reduce_scatter_tensor", "all_gather_into_tensor", "reduce_scatter",
            "all_gather", "broadcast", "all_to_all", "_reduce_scatter_base", "_all_gather_base", "all_gather_single",
            "reduce_scatter_single")
LAYOUTS = {"ep4_z0": (4, 0), "ep2_z1": (2, 1), "ep1_z3": (1, 3), "ep2_z0": (2, 0), "ep4_z1": (4, 1)}


class _Done:
    """A finished `Work` for calls made synchronously."""

    def wait(self, *args, **kwargs) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


class CommTimer:
    """Within `with`, `seconds` sums the wall time this rank spends inside torch.distributed collectives, and
    `cpu_seconds` this thread's CPU time there."""

    def __enter__(self) -> "CommTimer":
        self.seconds, self.cpu_seconds, self.calls, self._orig = 0.0, 0.0, 0, {}
        for name in _WRAPPED:
            if hasattr(dist, name):
                self._orig[name] = fn = getattr(dist, name)
                setattr(dist, name, self._wrap(fn))
        return self

    def _wrap(self, fn):
        def timed(*args, **kwargs):
            asynchronous = kwargs.pop("async_op", False)
            start, cpu = time.perf_counter(), time.thread_time()
            out = fn(*args, **kwargs)
            self.seconds += time.perf_counter() - start
            self.cpu_seconds += time.thread_time() - cpu
            self.calls += 1
            return _Done() if asynchronous else out
        return timed

    def __exit__(self, *exc) -> None:
        for name, fn in self._orig.items():
            setattr(dist, name, fn)


def _timed(fn, reps: int) -> float:
    """Median wall seconds of `fn` over `reps` runs, all ranks starting together, the slowest rank's."""
    times = []
    for _ in range(reps + 1):
        dist.barrier()
        start = time.perf_counter()
        fn()
        t = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        times.append(t.item())
    return statistics.median(times[1:])


def measure_rates(gemm: int, a2a_bytes: int, ar_bytes: int) -> dict:
    """Peak FLOP/s per rank, all-to-all bytes/s sent per rank, all-reduce bus bytes/s (module docstring)."""
    n = dist.get_world_size()
    a, b = torch.randn(gemm, gemm), torch.randn(gemm, gemm)
    reps, cpu = 8, []
    for _ in range(6):  # CPU seconds of this thread: the cores are shared, by these ranks and by others
        start = time.thread_time()
        for _ in range(reps):
            a @ b
        cpu.append((time.thread_time() - start) / reps)
    gemm_s = statistics.median(cpu[1:])
    send = torch.zeros(a2a_bytes // 4)
    recv = torch.empty_like(send)
    a2a_s = _timed(lambda: dist.all_to_all_single(recv, send), 15)
    flat = torch.zeros(ar_bytes // 4)
    ar_s = _timed(lambda: dist.all_reduce(flat), 15)
    tiny = torch.zeros(1)
    latency = _timed(lambda: [dist.all_reduce(tiny) for _ in range(10)], 5) / 10
    return {"peak_flops": 2 * gemm**3 / gemm_s, "latency_s": latency,
            "a2a_bytes_per_s": a2a_bytes * (n - 1) / n / a2a_s,
            "allreduce_bus_bytes_per_s": 2 * (n - 1) / n * ar_bytes / ar_s}


def run_layout(model: str, ep: int, stage: int, overrides: list[str], steps: int, rates: dict) -> dict:
    from train.build import EngineArgs, build_model
    from train.config import load_train_config
    from train.data import check_batch_sizes
    from train.plan import plan_memory
    from train.plan.time import Hardware, estimate_step_time
    from train.precision import build_precision
    from train.tools.bench_zero import micro_batches
    from train.trainer.schedule import LRSchedule
    from train.trainer.state import TrainState
    from train.trainer.step import StepContext, train_step
    from parallel import init_distributed

    extra = ["+parallel.deepspeed.zero_optimization.stage3_param_persistence_threshold=0"] if stage == 3 else []
    n = dist.get_world_size()
    cfg = load_train_config([f"model={model}", "trainer.micro_batch_size=4", "trainer.seq_len=128",
                             f"trainer.global_batch_size={8 * n}", "optim.schedule=constant", "optim.warmup_steps=0",
                             "parallel.overlap=false", f"parallel.ep_size={ep}", f"parallel.zero_stage={stage}",
                             *extra, *overrides])
    mesh = init_distributed(cfg)
    accum = check_batch_sizes(cfg.trainer, mesh.world_size)
    torch.manual_seed(cfg.trainer.seed)
    built = build_model(cfg, mesh, init_seed=cfg.trainer.seed, engine_args=EngineArgs(accum))
    schedule = LRSchedule(cfg.optim, steps + 2)
    state = TrainState(model=built.model, engine=built.engine, scheduler=schedule, data=None)
    ctx = StepContext(precision=build_precision(cfg.precision, mesh.device), schedule=schedule, mesh=mesh,
                      tokens_per_step=0)
    rows = []
    for s in range(steps + 1):
        batches = micro_batches(cfg, mesh, accum, s)
        dist.barrier()
        with CommTimer() as comm:
            start, cpu = time.perf_counter(), time.thread_time()
            train_step(state, batches, ctx)
            total, cpu = time.perf_counter() - start, time.thread_time() - cpu
        # slowest rank's compute (CPU seconds outside collectives), the least-waiting rank's communication (wall)
        t = torch.tensor([total, cpu - comm.cpu_seconds, -comm.seconds, comm.calls], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        step, compute, comm_s, calls = t.tolist()
        rows.append({"step": step, "compute": compute, "comm": -comm_s, "calls": calls})
    measured = {k: statistics.median(r[k] for r in rows[1:]) for k in ("step", "compute", "comm", "calls")}

    plan = plan_memory(cfg, n)
    peak = rates["peak_flops"] / 1e12

    def estimate(bw: float) -> dict:
        return estimate_step_time(cfg, n, plan, Hardware(peak_tflops=peak, compute_efficiency=1.0,
                                                         intra_node_gbps=bw / 1e9, inter_node_gbps=bw / 1e9,
                                                         gpus_per_node=n))["step_time_parts_s"]

    by_a2a, by_ar = estimate(rates["a2a_bytes_per_s"]), estimate(rates["allreduce_bus_bytes_per_s"])
    planned = {"compute": by_a2a["compute"], "all_to_all": by_a2a["all_to_all"],
               "zero_and_dp": by_ar["zero_gather_scatter"] + by_ar["dp_reduce"]}
    planned["comm"] = planned["all_to_all"] + planned["zero_and_dp"]
    beyond_latency = measured["comm"] - measured["calls"] * rates["latency_s"]
    return {"model": model, "ep_size": ep, "zero_stage": stage, "measured_s": measured, "planned_s": planned,
            "compute_ratio": measured["compute"] / planned["compute"],
            "comm_ratio": measured["comm"] / planned["comm"] if planned["comm"] else None,
            "comm_beyond_latency_ratio": beyond_latency / planned["comm"] if planned["comm"] else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--layouts", default="ep4_z0,ep2_z1,ep1_z3")
    parser.add_argument("--models", default="tiny_mixtral,tiny_deepseek_v3")
    parser.add_argument("--gemm", type=int, default=256)
    args, overrides = parser.parse_known_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tokens, d_model = 4 * 128, 128  # one micro-batch's rows of tiny_mixtral / tiny_deepseek_v3 width
    results = []
    for model in args.models.split(","):
        for name in args.layouts.split(","):
            ep, stage = LAYOUTS[name]
            rates = measure_rates(args.gemm, tokens * d_model * 4, 4 * 4_000_000)  # the load drifts: again
            results.append(dict(run_layout(model, ep, stage, overrides, args.steps, rates), rates=rates))
    if rank == 0:
        print("| model | ep_size | ZeRO | GEMM GFLOP/s (CPU s) | a2a / all-reduce GB/s | compute meas. / planned s | "
              "ratio | comm meas. / planned s | ratio | collectives / step | small all-reduce ms | "
              "(comm - calls x latency) / planned |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in results:
            m, p = r["measured_s"], r["planned_s"]
            comm_ratio = f"{r['comm_ratio']:.2f}" if r["comm_ratio"] is not None else "-"
            beyond = f"{r['comm_beyond_latency_ratio']:.2f}" if r["comm_ratio"] is not None else "-"
            q = r["rates"]
            print(f"| {r['model']} | {r['ep_size']} | {r['zero_stage']} | {q['peak_flops'] / 1e9:.1f} | "
                  f"{q['a2a_bytes_per_s'] / 1e9:.3f} / {q['allreduce_bus_bytes_per_s'] / 1e9:.3f} | "
                  f"{m['compute']:.3f} / {p['compute']:.3f} | "
                  f"{r['compute_ratio']:.2f} | {m['comm']:.3f} / {p['comm']:.3f} | {comm_ratio} | {m['calls']:.0f} | "
                  f"{q['latency_s'] * 1e3:.2f} | {beyond} |")
        print(json.dumps({"results": results}))
    dist.destroy_process_group()
