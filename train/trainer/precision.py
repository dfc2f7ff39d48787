"""The mixed-precision recipe, in one place.

Parameters, gradients and optimizer state are always fp32 (master weights). `bf16` runs the forward pass
under autocast to bfloat16; the model itself keeps the router, softmax, norms and losses in fp32.
`fp8` is rejected by config validation until it is implemented.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from train.config import PrecisionConfig


@dataclass
class Precision:
    name: str
    device: torch.device

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"fp32": None, "bf16": torch.bfloat16}[self.name]

    def autocast(self):
        """Context manager for forward passes (training and validation)."""
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)


def build_precision(cfg: PrecisionConfig, device: torch.device) -> Precision:
    if cfg.name == "fp8":
        raise NotImplementedError("precision=fp8 is not implemented yet: use precision=bf16")
    if cfg.name not in ("fp32", "bf16"):
        raise ValueError(f"precision.name={cfg.name!r}: choose fp32 or bf16")
    return Precision(name=cfg.name, device=device)
