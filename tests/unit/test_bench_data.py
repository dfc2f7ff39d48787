"""The loader benchmark at a tiny size: the JSON keys, and the index build's RSS stays small."""
import json

from train.data.bench import run


def test_bench_data_tiny():
    result = run(gb=0.004, seq_len=128, global_batch_size=8, micro_batch_size=4, read_steps=3)
    json.dumps(result)
    for key in ("tokens_per_s", "first_batch_s_start", "first_batch_s_late", "index_rss_bytes"):
        assert key in result and result[key] >= 0
    assert result["tokens_per_s"] > 0
    assert result["index_rss_bytes"] < 64 * 2**20
