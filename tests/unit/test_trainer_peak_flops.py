"""MFU's denominator: a configured peak wins; otherwise the GPU's name picks it; CPUs get the nominal value;
`measure` times a matmul once per device and dtype and reuses the cached figure."""
import json
from unittest import mock

import pytest
import torch

from train.config import load_train_config
from train.trainer import peak_flops as pf
from train.trainer.peak_flops import NOMINAL_PEAK, peak_flops_per_device
from train.trainer.validate import ConfigError, validate_config


def test_configured_value_wins():
    assert peak_flops_per_device(123e12, torch.device("cuda", 0)) == 123e12


def test_cpu_falls_back_to_nominal():
    assert peak_flops_per_device(None, torch.device("cpu")) == NOMINAL_PEAK


def test_gpu_name_picks_the_dense_bf16_peak():
    with mock.patch("torch.cuda.get_device_name", return_value="NVIDIA H100 80GB HBM3"):
        assert peak_flops_per_device(None, torch.device("cuda", 0)) == 989.4e12
    with mock.patch("torch.cuda.get_device_name", return_value="NVIDIA A100-SXM4-80GB"):
        assert peak_flops_per_device(None, torch.device("cuda", 0)) == 312e12
    with mock.patch("torch.cuda.get_device_name", return_value="Some Future GPU"):
        assert peak_flops_per_device(None, torch.device("cuda", 0)) == NOMINAL_PEAK


# ---- trainer.peak_flops=measure ------------------------------------------------------------------------------

def test_measure_gives_a_plausible_cpu_peak():
    flops = pf.measure_matmul_flops(torch.device("cpu"), torch.float32, size=256, trials=2)
    assert 1e8 < flops < 1e14  # any CPU of the last twenty years, fp32, one small matmul


def test_measurement_is_cached_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEFORGE_CACHE", str(tmp_path))
    calls = []

    def fake(device, dtype):
        calls.append(dtype)
        return 4.2e11

    monkeypatch.setattr(pf, "measure_matmul_flops", fake)
    first = pf.resolve_peak_flops(pf.MEASURE, torch.device("cpu"), "bf16")
    assert first.value == 4.2e11 and "measured now" in first.source
    stored = json.loads((tmp_path / pf.CACHE_FILE).read_text())
    key = pf.device_key(torch.device("cpu"), torch.bfloat16)
    assert stored[key]["flops"] == 4.2e11 and "bfloat16" in key and pf.cpu_model_name() in key

    again = pf.resolve_peak_flops(pf.MEASURE, torch.device("cpu"), "bf16")
    assert again.value == 4.2e11 and "measured earlier" in again.source
    assert calls == [torch.bfloat16]  # the second run read the cache

    fp8 = pf.resolve_peak_flops(pf.MEASURE, torch.device("cpu"), "fp8")  # fp8 reports against the bf16 peak
    assert fp8.value == 4.2e11 and calls == [torch.bfloat16]
    pf.resolve_peak_flops(pf.MEASURE, torch.device("cpu"), "fp32")  # another dtype: another entry
    assert calls == [torch.bfloat16, torch.float32]
    assert len(json.loads((tmp_path / pf.CACHE_FILE).read_text())) == 2
    assert not [p for p in tmp_path.iterdir() if p.name != pf.CACHE_FILE]  # no temporary file left behind


def test_unreadable_cache_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEFORGE_CACHE", str(tmp_path))
    (tmp_path / pf.CACHE_FILE).write_text("{not json")
    monkeypatch.setattr(pf, "measure_matmul_flops", lambda device, dtype: 7e11)
    assert pf.resolve_peak_flops(pf.MEASURE, torch.device("cpu"), "fp32").value == 7e11
    assert json.loads((tmp_path / pf.CACHE_FILE).read_text())


def test_config_accepts_null_number_and_measure():
    for value, expected in (("null", None), ("2.5e14", 2.5e14), ("measure", "measure")):
        cfg = load_train_config([f"trainer.peak_flops={value}"])
        assert cfg.trainer.peak_flops == expected
        validate_config(cfg, world_size=1)


@pytest.mark.parametrize("value", ["fast", "Measure", "-1", "true"])
def test_config_rejects_other_values(value):
    cfg = load_train_config([f"trainer.peak_flops={value}"])
    with pytest.raises(ConfigError, match=r"trainer.peak_flops=.* (is not valid|must be > 0).*null.*number.*measure"):
        validate_config(cfg, world_size=1)
