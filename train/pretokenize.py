"""`python -m train.pretokenize --out PREFIX [--workers N] [--shard-tokens N] [data overrides]`: tokenize the corpus
that `data=` names (the same overrides as training, e.g. `data=files data.paths=[a.jsonl] data.tokenizer=gpt2`)
into Megatron `PREFIX.bin`/`PREFIX.idx` (or shards `PREFIX_00000`, ... of about N tokens each) with a manifest
beside each pair and the tokenizer in `tokenizer/` of PREFIX's directory. A rerun keeps complete shards. The
last line printed is JSON: num_docs, num_tokens, tokens_per_s, workers, outputs, ... (train/data/pretokenize.py).
"""
from __future__ import annotations

import argparse
import json
import sys

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.pretokenize", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output prefix: PREFIX.bin/.idx (or PREFIX_00000.bin/.idx, ...)")
    parser.add_argument("--workers", type=int, default=None, help="tokenizing processes (default data.num_proc)")
    parser.add_argument("--shard-tokens", type=int, default=None,
                        help="cut a new shard at the first document boundary past this many tokens")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args, overrides = parser.parse_known_args(argv)
    try:
        bad = [o for o in overrides if o.startswith("-")]
        if bad:
            raise ValueError(f"unknown option(s) {bad}: pretokenize takes --out, --workers, --shard-tokens, "
                             "--no-progress and data overrides key=value")
        from train.config import compose, to_train_config
        from train.data.pretokenize import pretokenize

        data_cfg = to_train_config(compose(overrides)).data
        workers = args.workers if args.workers is not None else max(1, data_cfg.num_proc)
        summary = pretokenize(data_cfg, args.out, workers, args.shard_tokens,
                              progress=not args.no_progress)
    except (ValueError, KeyError, OSError, HydraException, OmegaConfBaseException) as e:  # TokenFileError: ValueError
        message = str(e.args[0] if isinstance(e, KeyError) and e.args else e)
        print("moeforge: " + "; ".join(line.strip() for line in message.splitlines() if line.strip()), file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    from train.quick_exit import skip_final_collection

    skip_final_collection()
    sys.exit(main(sys.argv[1:]))
