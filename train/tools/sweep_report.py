"""Report on a Hydra multirun: `python scripts/sweep_report.py SWEEP_DIR`.

Writes SWEEP_DIR/report.md, one row per job (pending, running, stopped and failed jobs included, failures with
their error below the table), and SWEEP_DIR/report.png: final train and validation loss against each swept value,
the train loss curves (validation losses as dots) against steps, and the train loss against cumulative training
FLOPs. Reading the sweep is `train/sweep.py`.

Columns: the swept values; total and active (per token) parameters and training FLOPs/token (`train/flops.py`);
steps done; final train loss (last step) and validation loss (last evaluation); tokens/s (median over the steps
after the first); load imbalance (most-loaded expert over the even share, mean over MoE layers and the last
tenth of the steps); dropped fraction (same tail); and `loss @ C`, every job's train loss at the same training
compute C, the least any job with a curve reached, so jobs of different cost compare fairly (the mean over the
steps in the last tenth of C: one step's loss is noisy).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt  # noqa: E402

from train.sweep import JobSummary, loss_at_flops, summarize_sweep  # noqa: E402


def _num(x, fmt="{:.4f}") -> str:
    return "–" if x is None else fmt.format(x)


def _human(n) -> str:
    if n is None:
        return "–"
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.3g}"


def _budget(runs: list[JobSummary]) -> float | None:
    ends = [s.curve_flops[-1] for s in runs if s.curve_flops]
    return min(ends) if ends else None


def write_markdown(sweep_dir: Path, keys: list[str], runs: list[JobSummary]) -> Path:
    budget = _budget(runs)
    head = ["job", "state", *keys, "params", "active", "FLOPs/token", "steps", "train loss", "val loss",
            "tokens/s", "load imbalance", "dropped", f"loss @ {_human(budget)}FLOP"]
    lines = [f"# Sweep report: {sweep_dir}", "",
             f"{len(runs)} jobs: " + ", ".join(f"{sum(s.state == st for s in runs)} {st}"
                                               for st in sorted({s.state for s in runs})) + ".", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in runs:
        steps = f"{s.steps}/{s.max_steps}" if s.max_steps else str(s.steps)
        row = [str(s.num), f"**{s.state}**" if s.state != "finished" else s.state, *(s.swept[k] for k in keys),
               _human(s.total_params), _human(s.active_params), _human(s.flops_per_token), steps,
               _num(s.train_loss), _num(s.val_loss), _num(s.tokens_per_s, "{:.0f}"), _num(s.load_imbalance, "{:.2f}"),
               _num(s.dropped_frac, "{:.3f}"), _num(loss_at_flops(s, budget) if budget else None)]
        lines.append("| " + " | ".join(row) + " |")
    notes = [f"- job {s.num} ({s.state}): {s.reason}" for s in runs if s.state != "finished" and s.reason]
    if notes:
        lines += ["", "Not finished:", *notes]
    lines += ["", "Load imbalance: most-loaded expert / even share (1.0 = balanced), mean over MoE layers and the last "
              "tenth of the steps. `loss @ C`: train loss at the same cumulative training compute C (tokens × "
              "FLOPs/token), the least any job reached; mean over the steps in the last tenth of C.", ""]
    path = sweep_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def _as_number(v: str):
    try:
        return float(v)
    except ValueError:
        return None


def write_plot(sweep_dir: Path, keys: list[str], runs: list[JobSummary]) -> Path:
    done = [s for s in runs if s.train_loss is not None]
    n = len(keys) + 2
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 4))
    for ax, key in zip(axes, keys):
        xs = [s.swept[key] for s in done]
        numeric = all(_as_number(x) is not None for x in xs) and not key.endswith("seed")  # seeds are labels
        pos = [_as_number(x) for x in xs] if numeric else [sorted(set(xs)).index(x) for x in xs]
        for p, s in zip(pos, done):
            ax.plot(p, s.train_loss, "o" if s.state == "finished" else "x", color="C0")
            if s.val_loss is not None:
                ax.plot(p, s.val_loss, "s", color="C1", fillstyle="none")
        if not numeric:
            ax.set_xticks(range(len(set(xs))), sorted(set(xs)), rotation=20)
        elif len({*pos}) > 2 and min(pos) > 0 and max(pos) / min(pos) >= 4:
            ax.set_xscale("log", base=2)
        ax.set(xlabel=key, ylabel="final loss", title=f"final loss vs {key.split('.')[-1]}")
        ax.plot([], [], "o", color="C0", label="train")
        ax.plot([], [], "s", color="C1", fillstyle="none", label="val")
        ax.legend()
    ax_s, ax_f = axes[-2], axes[-1]
    for i, s in enumerate(done):
        label = ", ".join(f"{k.split('.')[-1]}={s.swept[k]}" for k in keys) or f"job {s.num}"
        style = "-" if s.state == "finished" else "--"
        ax_s.plot(s.curve_steps, s.curve_loss, style, color=f"C{i % 10}", label=f"{label} ({s.state})", alpha=0.6)
        if s.val_steps:
            ax_s.plot(s.val_steps, s.val_losses, "o-", color=f"C{i % 10}", markersize=4, linewidth=2)
        if s.curve_flops:
            ax_f.plot(s.curve_flops, s.curve_loss, style, color=f"C{i % 10}", label=label)
    ax_s.set(xlabel="step", ylabel="loss", title="loss curves (train; val: dots)")
    ax_f.set(xlabel="cumulative training FLOPs", ylabel="train loss", title="loss vs compute")
    for ax in (ax_s, ax_f):
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = sweep_dir / "report.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args(argv)
    keys, runs = summarize_sweep(args.sweep_dir)
    if not runs:
        raise SystemExit(f"{args.sweep_dir} holds no jobs (no multirun.yaml, no numbered job dirs)")
    paths = [write_markdown(args.sweep_dir, keys, runs), write_plot(args.sweep_dir, keys, runs)]
    print(paths[0].read_text())
    return paths

