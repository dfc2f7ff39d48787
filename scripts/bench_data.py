"""Loader benchmark: a synthetic token corpus (default 1 GB, in a temporary directory, deleted afterwards), then
the loader's tokens/s per rank at seq_len 4096 (file in the page cache), the time to the first batch at the start
and near the end of the run, and the resident-memory growth of building the blend index.

    python scripts/bench_data.py [--gb 1] [--seq 4096] [--batch 64] [--steps 20] [--workdir DIR]

The work is `train.data.bench.run`. Last line: JSON with `tokens_per_s`, `first_batch_s_start`,
`first_batch_s_late`, `index_rss_bytes` (and the corpus and index sizes, build times).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.data.bench import run  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=1.0, help="synthetic corpus size in GB of uint16 tokens")
    p.add_argument("--seq", type=int, default=4096, help="trainer.seq_len")
    p.add_argument("--batch", type=int, default=64, help="trainer.global_batch_size (one rank)")
    p.add_argument("--steps", type=int, default=20, help="global batches timed for tokens/s")
    p.add_argument("--workdir", default=None, help="where the temporary corpus goes (default: the system tmp)")
    a = p.parse_args()
    result = run(gb=a.gb, seq_len=a.seq, global_batch_size=a.batch, micro_batch_size=min(8, a.batch),
                 read_steps=a.steps, workdir=a.workdir)
    print(f"{result['num_tokens']:,} tokens, {result['num_samples']:,} samples: {result['tokens_per_s']:,.0f} tokens/s "
          f"per rank, first batch {result['first_batch_s_start']:.3f} s at the start, "
          f"{result['first_batch_s_late']:.3f} s late, index build +{result['index_rss_bytes'] / 2**20:.1f} MiB RSS")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
