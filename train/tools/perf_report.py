"""Write the speed figures of a `scripts/gpu_check.sh` run into docs/performance.md.

    python scripts/perf_report.py OUT_DIR [--doc docs/performance.md]

Reads the last line (JSON) of every `bench_moe_*.log` and `bench_step_*.log` in OUT_DIR and replaces the part of
the document between the `<!-- gpu-figures:begin -->` and `<!-- gpu-figures:end -->` markers with tables of them,
headed by the device name and the date. Everything else in the document is left as it is.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

BEGIN, END = "<!-- gpu-figures:begin -->", "<!-- gpu-figures:end -->"


def last_json(path: Path) -> dict | None:
    """The log's last line as JSON, or None when the run did not finish with one."""
    lines = path.read_text(errors="replace").strip().splitlines()
    try:
        return json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        return None


def _ms(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def moe_table(rows: list[dict]) -> list[str]:
    out = ["| case | dtype | T | E | F | K | ours ms | per-expert loop ms | compiled ms | HF ms | HF eager ms | "
           "DeepSpeed ms | torchtitan ms | dense floor ms | loop / ours |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        loop = r.get("ours_loop_ms")
        ratio = "-" if loop is None else f"{loop / r['ours_ms']:.2f}"
        out.append(f"| {r['case']} | {r['dtype']} | {r['tokens']} | {r['experts']} | {r['hidden']} | {r['top_k']} | "
                   f"{_ms(r['ours_ms'])} | {_ms(loop)} | {_ms(r.get('ours_compiled_ms'))} | {_ms(r['hf_ms'])} | "
                   f"{_ms(r.get('hf_eager_ms'))} | {_ms(r['deepspeed_ms'])} | {_ms(r.get('torchtitan_ms'))} | "
                   f"{_ms(r['dense_floor_ms'])} | {ratio} |")
    return out


def step_table(runs: list[tuple[str, dict]]) -> list[str]:
    out = ["| run | model | precision | tokens/step | ours tokens/s | HF tokens/s | speedup | MFU ours | MFU HF |",
           "|---|---|---|---|---|---|---|---|---|"]
    for name, r in runs:
        out.append(f"| {name} | {r.get('model')} | {r.get('precision')} | {r.get('tokens_per_step')} | "
                   f"{r['ours_tokens_per_s']:.0f} | {r['hf_tokens_per_s']:.0f} | {r.get('speedup', 0):.2f} | "
                   f"{100 * r['mfu']:.1f}% | {100 * r.get('hf_mfu', 0):.1f}% |")
    return out


def render(out_dir: Path) -> str:
    moe_rows, steps, device = [], [], None
    for log in sorted(out_dir.glob("bench_moe_*.log")):
        r = last_json(log)
        if r:
            device = device or r.get("device")
            moe_rows += r.get("results", [])
    for log in sorted(out_dir.glob("bench_step_*.log")):
        r = last_json(log)
        if r:
            device = device or r.get("device")
            steps.append((log.stem.removeprefix("bench_step_"), r))
    if not moe_rows and not steps:
        raise SystemExit(f"no benchmark JSON in {out_dir}: run scripts/gpu_check.sh first")
    lines = [f"Measured by `bash scripts/gpu_check.sh` on **{device or 'unknown device'}**, "
             f"{datetime.date.today().isoformat()}.", ""]
    if moe_rows:
        lines += ["MoE layer forward+backward (`scripts/bench_moe.py --device cuda`):", "", *moe_table(moe_rows), ""]
    if steps:
        lines += ["Whole training steps (`scripts/bench_step.py`):", "", *step_table(steps), ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--doc", type=Path, default=Path(__file__).resolve().parents[2] / "docs" / "performance.md")
    args = p.parse_args()
    doc = args.doc.read_text()
    if BEGIN not in doc or END not in doc:
        sys.exit(f"{args.doc} has no {BEGIN} ... {END} section to fill")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    args.doc.write_text(f"{head}{BEGIN}\n{render(args.out_dir)}\n{END}{tail}")
    print(f"wrote the GPU figures into {args.doc}")

