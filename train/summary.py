"""`python -m train.summary model=NAME [overrides]`: parameter and FLOP summary of a model config.

Builds the model on the meta device (no memory, so full sizes work), cross-checks the analytic count against
the built module, prints a readable breakdown and, as the last line, one JSON object with `total_params`,
`active_params` and `flops_per_token`.
"""
from __future__ import annotations

import json
import sys


from train.config import compose, to_train_config
from train.flops import flops_per_token, param_breakdown


def _built_param_count(model_cfg) -> int | None:
    try:
        from train.build import meta_model
    except ImportError:  # model package not importable: analytic count only
        return None
    return sum(p.numel() for p in meta_model(model_cfg).parameters())


def summarize(model_cfg, seq_len: int) -> dict:
    b = param_breakdown(model_cfg)
    built = _built_param_count(model_cfg)
    if built is not None and built != b.total:
        raise RuntimeError(f"analytic parameter count {b.total} != built model's {built}: train/flops.py is stale")
    return {
        "model": model_cfg.name,
        "total_params": b.total,
        "active_params": b.active,
        "flops_per_token": flops_per_token(model_cfg, seq_len),
        "seq_len": seq_len,
        "breakdown": {k: {"total": v, "active": b.active_parts[k]} for k, v in sorted(b.parts.items())},
    }


def _human(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def main(argv: list[str]) -> None:
    cfg = to_train_config(compose(argv))
    out = summarize(cfg.model, cfg.trainer.seq_len)
    print(f"{out['model']}: {_human(out['total_params'])} parameters, {_human(out['active_params'])} active per token, "
          f"{_human(out['flops_per_token'])} training FLOPs/token at seq_len {out['seq_len']}")
    for name, row in out["breakdown"].items():
        print(f"  {name:<24} total {_human(row['total']):>9}   active {_human(row['active']):>9}")
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
