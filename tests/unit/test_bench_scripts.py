"""Smoke tests of the hand-run benchmarks in scripts/: tiny shapes, one repeat, the last line's JSON."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_moe_smoke(tmp_path):
    """ours, HF, DeepSpeed and the dense floor all run and time; ours and HF agree (the script asserts it); the
    GPU report (scripts/perf_report.py) renders its JSON into the marked section of a document."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MOEFORGE_TORCHTITAN_PATH": ""}
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_moe.py"), "--tokens", "64", "--d-model", "32",
                          "--experts", "4", "--hidden", "64", "--repeats", "1", "--warmup", "0", "--dtype", "fp32",
                          "--case", "default", "--threads", "1"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("ours_ms", "ours_loop_ms", "hf_ms", "deepspeed_ms", "dense_floor_ms"):
        assert result[key] > 0, key
    assert result["torchtitan_ms"] is None or result["torchtitan_ms"] > 0
    assert (result["torchtitan_ms"] is None) == (result["torchtitan_error"] is not None)
    shape = tuple(result[k] for k in ("tokens", "d_model", "experts", "hidden", "top_k"))
    assert shape == (64, 32, 4, 64, 2)
    assert result["dtype"] == "fp32"
    assert [r["case"] for r in result["results"]] == ["default"]
    assert result["results"][0]["max_abs_diff_vs_ours"]["deepspeed"] < 1e-6

    (tmp_path / "bench_moe_smoke.log").write_text(out.stdout)
    doc = tmp_path / "performance.md"
    doc.write_text("# head\n<!-- gpu-figures:begin -->\nnone yet\n<!-- gpu-figures:end -->\ntail\n")
    rep = subprocess.run([sys.executable, str(ROOT / "scripts" / "perf_report.py"), str(tmp_path), "--doc", str(doc)],
                         capture_output=True, text=True, timeout=60)
    assert rep.returncode == 0, rep.stderr[-2000:]
    text = doc.read_text()
    assert "none yet" not in text and text.startswith("# head") and text.endswith("tail\n")
    assert "| default | fp32 | 64 | 4 | 64 | 2 |" in text and "**cpu**" in text


def test_bench_ep_smoke():
    """ours (overlap on and off, fp8 dispatch) and DeepSpeed's MoE at ep_size 2 run and time; in fp32 their outputs
    agree tightly (the script fails otherwise), and ours sends fewer bytes per token than DeepSpeed's dense
    capacity buffer."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "scripts" / "bench_ep.py"), "--tokens", "64", "--d-model", "32", "--experts", "4",
                          "--hidden", "64", "--shared-hidden", "64", "--iters", "1", "--warmup", "0", "--dtype", "fp32"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("ours_ms", "ours_ms_no_overlap", "ours_fp8_ms", "deepspeed_ms"):
        assert 0 < result[key] < float("inf"), key
        assert 0 < result[key.replace("_ms", "_cpu_ms")] < float("inf"), key
    assert result["ours_over_deepspeed_min"] <= result["ours_over_deepspeed"] <= result["ours_over_deepspeed_max"]
    assert (result["ep_size"], result["world_size"], result["dtype"]) == (2, 2, "fp32")
    assert result["max_abs_diff"] < 1e-6 and result["dx_max_abs_diff"] < 1e-6
    assert 0 < result["ours_bytes_per_token"] < result["deepspeed_bytes_per_token"]
    assert result["ours_fp8_bytes_per_token"] < result["ours_bytes_per_token"]


def test_bench_loss_head_smoke():
    """Both heads run in fp32 and bf16; the chunked one saves and holds less and agrees with the plain one."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_loss_head.py"), "--tokens", "256", "--vocab",
                          "512", "--d-model", "32", "--chunk", "64", "--repeats", "1", "--warmup", "0", "--threads", "1",
                          "--device", "cpu"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert (result["tokens"], result["vocab"], result["d_model"], result["chunk"]) == (256, 512, 32, 64)
    assert [r["dtype"] for r in result["results"]] == ["fp32", "bf16"]
    for r in result["results"]:
        assert r["chunked_saved_bytes"] < r["plain_saved_bytes"] / 4 and r["chunked_peak_bytes"] < r["plain_peak_bytes"]
        assert r["plain_ms"] > 0 and r["chunked_ms"] > 0
        assert r["max_rel_diff_loss"] < 1e-5 and r["max_rel_diff_grad_h"] < 1e-5
