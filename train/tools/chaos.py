"""`scripts/chaos.py`: train a small multi-rank job through `launch/torchrun.sh` (elastic) under a seeded random
schedule of faults, run the same job uninterrupted, and compare. Last line JSON: `faults` (what was injected,
when, what the run did), `recovered`, `final_loss`, `reference_final_loss`, `weights_equal`, `tokens_equal`,
`losses_equal`, `skipped_steps_equal`, `lost_steps` (steps computed more than once), `resumes`, `launches`,
`watchdog_dumps`, `incomplete_saves`.

    python scripts/chaos.py --faults 6 --seed 1 [--nproc 4] [--steps 32] [overrides ...]

Faults (each at a step the schedule draws; the schedule always starts with a hang, a kill during its recovery and a
failed save):
- `hang`: SIGSTOP of one rank. Its peers wait in a collective; their watchdogs (`trainer.watchdog_s`) dump their
  stacks and exit; torchrun kills the stopped rank (30 s after SIGTERM) and restarts the group.
- `kill`: SIGKILL of one rank; at least one kill lands while the job restarts from the fault before it.
- `save_fail`: RLIMIT_FSIZE of one rank lowered to 64 KiB until its next save has failed (EFBIG part-way through the
  checkpoint), then raised back if the rank is still alive.
- `damage`: the newest complete checkpoint's first shard truncated, then at once a SIGKILL of one rank, so the
  restart must skip the damaged checkpoint and resume from the one before (`skipped_damaged` says it did; a save
  completing between the two makes the damaged one no longer the newest).
- `term`: SIGTERM to the whole job, as SLURM sends it: the launcher must exit 0 after a complete save; the same
  command is then run again.
- `nan`: a NaN loss at one or two steps (MOEFORGE_INJECT_NAN_STEPS). These are data-borne, so the reference run
  gets them too; what is checked is that restarts skip exactly the same steps.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from parallel.ports import free_port
from train.checkpoint import iter_weights
from train.runs import read_records, read_status
from train.trainer.faults import NAN_STEPS_ENV

REPO = Path(__file__).resolve().parents[2]

BASE = ["model=tiny_deepseek_v3", "model.num_layers=2", "model.d_model=64", "parallel.ep_size=2",
        "trainer.global_batch_size=8", "trainer.micro_batch_size=2", "trainer.seq_len=32", "trainer.eval_every=0",
        "logging.progress=false", "data.max_corpus_mb=1", "data.tokenizer_vocab_size=2048", "model.vocab_size=2048"]
RUNTIME_KINDS = ("hang", "kill", "save_fail", "damage", "term")
FSIZE_LIMIT = 64 * 1024  # below a shard of the tiny model, above the small files a rank writes


def plan(num_faults: int, seed: int, steps: int, nproc: int, save_every: int = 2) -> list[dict]:
    """The schedule: a hang, a kill during the hang's recovery, a failed save, then drawn kinds; triggers at
    increasing steps."""
    rng = random.Random(seed)
    kinds = ["hang", "kill", "save_fail"][:num_faults]
    extra = ["term", "damage", "nan"]
    rng.shuffle(extra)
    while len(kinds) < num_faults:
        kinds.append(extra.pop() if extra else rng.choice(["kill", "hang", "save_fail", "damage", "term"]))
    runtime = [k for k in kinds if k != "nan"]
    triggers = sorted(rng.sample(range(4, steps - 2), len(runtime)))
    faults, prev = [], None
    for kind, step in zip(runtime, triggers):
        if kind == "hang" and step % save_every == 0:  # stop it in a step, not in the save after it (which has
            step += 1                                   # the watchdog's longer allowance)
        fault = {"kind": kind, "trigger_step": step, "rank": rng.randrange(1 if kind == "save_fail" else 0, nproc)}
        if prev == "hang" and kind == "kill" and not any(f.get("during_recovery") for f in faults):
            fault["during_recovery"] = True  # the restart after the hang is in progress
            fault["delay_s"] = round(rng.uniform(0.5, 3.0), 1)  # into the restarted ranks' start
        faults.append(fault)
        prev = kind
    for _ in range(kinds.count("nan")):
        first = rng.randrange(2, steps - 1)
        faults.append({"kind": "nan", "steps": [first, first + 1] if rng.random() < 0.5 else [first]})
    return faults


class Job:
    """One `launch/torchrun.sh` process group, its output lines timestamped."""

    def __init__(self, args: list[str], env: dict, log):
        self.t0 = time.time()
        self.proc = subprocess.Popen(["bash", "launch/torchrun.sh", *args], cwd=REPO, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        self._log = log
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.time(), line))
            self._log.write(line)

    def kill(self) -> None:
        """SIGKILL what is left of the job: the launcher's group and the workers (each in a session of its own)."""
        pids = [pid for pid, _ in self.workers().values()]
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def first_line_after(self, t: float, needle: str):
        return next((ts for ts, line in list(self.lines) if ts >= t and needle in line), None)

    def workers(self) -> dict[int, tuple[int, int]]:
        """RANK -> (pid, restart round) of the live workers."""
        import psutil

        found = {}
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return found
        for child in children:
            try:
                env = child.environ()
                if "RANK" in env and "train" in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                    found[int(env["RANK"])] = (child.pid, int(env.get("TORCHELASTIC_RESTART_COUNT", "0")))
            except psutil.Error:
                continue
        return found


def last_step(run_dir: Path) -> int:
    """The step of the newest line of metrics.jsonl (it goes back after a restart)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    for line in reversed(path.read_text().splitlines()):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in record and "step" in record:
            return int(record["step"])
    return 0


def wait_until(cond, job: Job, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        if job.proc.poll() is not None:
            return None
        time.sleep(0.05)
    raise TimeoutError(f"chaos: {what} did not happen within {timeout:.0f} s")


def complete_checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in (run_dir / "checkpoints").glob("step_*") if (p / "COMPLETE").is_file())


def inject(fault: dict, job: Job, run_dir: Path, save_every: int, t_start: float) -> dict:
    """Inject one runtime fault; returns what happened (times in s since the chaos run started)."""
    import psutil

    kind, out = fault["kind"], dict(fault)
    if fault.get("during_recovery"):
        round_now = max((r for _, r in job.workers().values()), default=0)
        wait_until(lambda: any(r > round_now for _, r in job.workers().values()) or None, job, 300,
                   "the restart")
        time.sleep(fault["delay_s"])
    else:
        wait_until(lambda: last_step(run_dir) >= fault["trigger_step"] or None, job, 600,
                   f"step {fault['trigger_step']}")
    workers = wait_until(lambda: (lambda w: w if fault["rank"] in w else None)(job.workers()), job, 120,
                         "the workers")
    t = time.time()
    out.update(t=round(t - t_start, 1), at_step=last_step(run_dir))
    if job.proc.poll() is not None or not workers:
        out["skipped"] = "the job had already ended"
        return out
    pid = workers[fault["rank"]][0]
    if kind == "kill":
        os.kill(pid, signal.SIGKILL)
    elif kind == "hang":
        os.kill(pid, signal.SIGSTOP)
        seen = wait_until(lambda: job.first_line_after(t, "moeforge: watchdog:"), job, 600, "the watchdog")
        timeout = job.first_line_after(t, "Timed out waiting")  # a collective timeout (should not come first)
        out["detected_s"] = round(seen - t, 1) if seen else None
        if timeout and (not seen or timeout < seen):
            out["detected_by_collective_timeout_s"] = round(timeout - t, 1)
    elif kind == "save_fail":
        proc = psutil.Process(pid)
        hard = proc.rlimit(resource.RLIMIT_FSIZE)[1]
        proc.rlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, hard))
        next_save = (out["at_step"] // save_every + 1) * save_every
        wait_until(lambda: (not psutil.pid_exists(pid) or last_step(run_dir) > next_save) or None, job, 600,
                   "the failing save")
        out["save_step"] = next_save
        if psutil.pid_exists(pid) and proc.status() != psutil.STATUS_ZOMBIE:
            proc.rlimit(resource.RLIMIT_FSIZE, (hard, hard))
            out["outcome"] = "the rank lived through it (save reported failed)"
        else:
            out["outcome"] = "the rank exited: the job restarted"
    elif kind == "damage":
        found = complete_checkpoints(run_dir)
        if len(found) < 2:
            out["skipped"] = "fewer than two complete checkpoints"
            return out
        shard = found[-1] / "state" / "__0_0.distcp"
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
        os.kill(pid, signal.SIGKILL)  # the restart must now pass over the damaged checkpoint
        out["damaged"], out["then_killed_rank"] = found[-1].name, fault["rank"]
        wait_until(lambda: job.first_line_after(t, "resumed from"), job, 600, "the resume")
        out["skipped_damaged"] = any(found[-1].name in line and "trying the previous checkpoint" in line
                                     for ts, line in list(job.lines) if ts >= t)
        out["resumed_from"] = next((line.split("resumed from ")[1].split(":")[0].rsplit("/", 1)[-1]
                                    for ts, line in list(job.lines) if ts >= t and "resumed from" in line), None)
    elif kind == "term":
        os.killpg(job.proc.pid, signal.SIGTERM)
        out["launcher_rc"] = job.proc.wait(timeout=600)
        out["status"] = (read_status(run_dir) or {}).get("state")
    return out


def run_job(run_dir: Path, overrides: list[str], env: dict, log) -> Job:
    env = dict(env, MASTER_PORT=str(free_port()), RDZV_ID=f"chaos-{run_dir.name}-{time.time_ns()}")
    return Job([*overrides, f"trainer.run_dir={run_dir}"], env, log)


def count_resumes(job_lines) -> int:
    """Starts that resumed from a checkpoint (a start killed before it got there is not counted)."""
    return sum("resumed from" in line for _, line in job_lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--faults", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--save-every", type=int, default=2)
    p.add_argument("--watchdog-s", type=int, default=10)
    p.add_argument("--timeout", type=float, default=1200, help="seconds each launch may take")
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory, removed at the end")
    p.add_argument("overrides", nargs="*", help="trainer overrides after the small default job's")
    a = p.parse_args()
    if a.faults < 1 or a.steps < 4 * a.faults + 4:
        sys.exit(f"chaos: --steps={a.steps} is too few for --faults={a.faults}: give at least {4 * a.faults + 4}")
    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="moeforge-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    faults = plan(a.faults, a.seed, a.steps, a.nproc, a.save_every)
    nan_steps = sorted({s for f in faults if f["kind"] == "nan" for s in f["steps"]})
    overrides = [*BASE, f"trainer.max_steps={a.steps}", f"trainer.save_every={a.save_every}",
                 f"trainer.watchdog_s={a.watchdog_s}", *a.overrides]
    env = dict(os.environ, NPROC_PER_NODE=str(a.nproc), MAX_RESTARTS=str(2 * a.faults + 2),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), WANDB_MODE="disabled")
    if nan_steps:
        env[NAN_STEPS_ENV] = ",".join(map(str, nan_steps))
    print(f"chaos: seed {a.seed}, {a.nproc} ranks, {a.steps} steps, schedule "
          f"{json.dumps([{k: v for k, v in f.items()} for f in faults])}; logs in {workdir}", flush=True)

    with open(workdir / "reference.log", "w", buffering=1) as log:
        ref = run_job(workdir / "reference", overrides, env, log)
        try:
            ref_rc = ref.proc.wait(timeout=a.timeout)
        finally:
            ref.kill()
    if ref_rc != 0:
        sys.exit(f"chaos: the uninterrupted reference run failed ({ref_rc}); see {workdir / 'reference.log'}")

    run_dir, done, launches = workdir / "chaos", [], 1
    t_start = time.time()
    with open(workdir / "chaos.log", "w", buffering=1) as log:
        job = run_job(run_dir, overrides, env, log)
        lines = []
        try:
            for fault in (f for f in faults if f["kind"] in RUNTIME_KINDS):
                record = inject(fault, job, run_dir, a.save_every, t_start)
                print(f"chaos: {json.dumps(record)}", flush=True)
                done.append(record)
                if job.proc.poll() is not None and fault["kind"] == "term":  # then rerun the same command
                    lines += job.lines
                    job, launches = run_job(run_dir, overrides, env, log), launches + 1
            rc = job.proc.wait(timeout=a.timeout)
        finally:
            job.kill()
        lines += job.lines
    elapsed = time.time() - t_start

    records, ref_records = read_records(run_dir), read_records(workdir / "reference")
    logged = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    logged_steps = [r["step"] for r in logged if "loss" in r and "step" in r]
    final = f"checkpoints/step_{a.steps:08d}"
    weights_equal = False
    if (run_dir / final / "COMPLETE").is_file():
        ref_w = dict(iter_weights(workdir / "reference" / final))
        got_w = dict(iter_weights(run_dir / final))
        weights_equal = set(ref_w) == set(got_w) and all(got_w[k].equal(ref_w[k]) for k in ref_w)
    final_rec = records[-1] if records else {}
    result = {
        "seed": a.seed, "nproc": a.nproc, "steps": a.steps,
        "faults": done + [f for f in faults if f["kind"] == "nan"],
        "recovered": rc == 0 and (read_status(run_dir) or {}).get("state") == "finished"
                     and final_rec.get("step") == a.steps,
        "final_loss": final_rec.get("loss"), "reference_final_loss": ref_records[-1]["loss"],
        "weights_equal": weights_equal,
        "tokens_equal": final_rec.get("tokens") == ref_records[-1]["tokens"],
        "losses_equal": [r["loss"] for r in records] == [r["loss"] for r in ref_records],
        "skipped_steps_equal": [r["step"] for r in records if r.get("skipped")]
                               == [r["step"] for r in ref_records if r.get("skipped")],
        "lost_steps": len(logged_steps) - len(set(logged_steps)),
        "resumes": count_resumes(lines), "launches": launches,
        "watchdog_dumps": sum("moeforge: watchdog:" in line for _, line in lines),
        "chaos_wall_s": round(elapsed, 1),
        "incomplete_saves": sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")),
    }
    if a.workdir is None and result["recovered"] and result["weights_equal"]:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
