"""MFU's denominator: a configured peak wins; otherwise the GPU's name picks it; CPUs get the nominal value."""
from unittest import mock

import torch

from train.trainer.peak_flops import NOMINAL_PEAK, peak_flops_per_device


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
