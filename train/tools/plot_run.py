"""Plot a run's metrics: `python scripts/plot_run.py RUN_DIR`.

Reads RUN_DIR/metrics.jsonl through `train.runs.read_records` (the last record of each step wins, so a resumed
run's repeated steps plot once) and writes into RUN_DIR/plots/:
- `loss.png`: loss, lm_loss, val_loss and mtp_loss (left), aux_loss and each aux/<term> (right, log scale);
- `expert_load_layer{i}.png`: for each MoE layer, a steps × experts heatmap of each expert's share of the
  routed tokens relative to the even share (1.0 = balanced).
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from train.runs import read_records, series as _series  # noqa: E402

_LOAD_KEY = re.compile(r"^moe/layer(\d+)/tokens_per_expert$")


def plot_losses(records: list[dict], out: Path) -> Path:
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, style in (("loss", "-"), ("lm_loss", "-"), ("val_loss", "o-"), ("mtp_loss", "--")):
        x, y = _series(records, key)
        if x:
            ax_l.plot(x, y, style, label=key, markersize=3)
    ax_l.set(xlabel="step", ylabel="loss", title="losses")
    ax_l.legend()
    aux_keys = ["aux_loss"] + sorted({k for r in records for k in r if k.startswith("aux/")})
    for key in aux_keys:
        x, y = _series(records, key)
        if x and any(v > 0 for v in y):
            ax_a.plot(x, y, label=key)
    ax_a.set(xlabel="step", title="balance terms (coefficient-weighted)")
    if ax_a.lines:
        ax_a.set_yscale("log")
        ax_a.legend()
    fig.tight_layout()
    path = out / "loss.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_expert_load(records: list[dict], out: Path) -> list[Path]:
    layers = sorted({int(m.group(1)) for r in records for k in r if (m := _LOAD_KEY.match(k))})
    paths = []
    for i in layers:
        key = f"moe/layer{i}/tokens_per_expert"
        rows = [(r["step"], r[key]) for r in records if key in r]
        steps = [s for s, _ in rows]
        counts_SE = np.asarray([c for _, c in rows], dtype=np.float64)
        load_SE = counts_SE / np.maximum(counts_SE.mean(axis=1, keepdims=True), 1e-9)
        fig, ax = plt.subplots(figsize=(max(6, counts_SE.shape[1] * 0.3), 4.5))
        im = ax.imshow(load_SE.T, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest",
                       extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, counts_SE.shape[1] - 0.5))
        fig.colorbar(im, ax=ax, label="load / even share")
        ax.set(xlabel="step", ylabel="expert", title=f"expert load, layer {i}")
        fig.tight_layout()
        path = out / f"expert_load_layer{i}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    records = read_records(args.run_dir)
    if not records:
        raise SystemExit(f"{args.run_dir}/metrics.jsonl has no step records")
    out = args.run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    paths = [plot_losses(records, out), *plot_expert_load(records, out)]
    for p in paths:
        print(p)
    return paths

