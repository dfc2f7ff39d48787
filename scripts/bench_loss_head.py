"""Benchmark the loss head: whole logits against the chunked head (`model.loss_chunk_tokens`), forward + backward,
fp32 and bf16 autocast: saved bytes, peak bytes and time.

The code is `train/tools/bench_loss_head.py`; this file only runs it."""
from train.tools.bench_loss_head import main

if __name__ == "__main__":
    main()
