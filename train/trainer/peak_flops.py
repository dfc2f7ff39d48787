"""Per-device peak FLOP/s for MFU. `trainer.peak_flops=null` picks it from the device name.

MFU is reported against the dense bf16 tensor-core peak whatever the precision recipe (torchtitan's and
Megatron's convention), so runs in different precisions compare on one scale. A device not in the table (and
every CPU) falls back to a nominal 1 TFLOP/s: set `trainer.peak_flops` for a meaningful MFU there.
"""
from __future__ import annotations

from typing import Optional

import torch

# Dense bf16 peaks from the vendors' data sheets (SXM parts), FLOP/s.
_BF16_PEAK = (
    ("H200", 989.4e12),
    ("H100", 989.4e12),  # the PCIe part is lower (756e12): set trainer.peak_flops for it
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
)
NOMINAL_PEAK = 1.0e12


def peak_flops_per_device(configured: Optional[float], device: torch.device) -> float:
    """`configured` when set; else the table's value for this CUDA device's name; else NOMINAL_PEAK."""
    if configured is not None:
        return float(configured)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in _BF16_PEAK:
            if key in name:
                return peak
    return NOMINAL_PEAK
