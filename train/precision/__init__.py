"""The mixed-precision recipe, in one place: autocast for forward passes, and the model converters it needs.

Parameters, gradients and optimizer state are always fp32 (master weights). `bf16` runs the forward pass
under autocast to bfloat16; the model itself keeps the router, softmax, norms and losses in fp32. `fp8` autocasts
the same way, and its model converter (`Fp8Converter`, `fp8/`) puts the attention/MLP/shared-expert linears and
routed-expert GEMMs in FP8 with `precision.recipe`'s scaling; their Parameters stay the fp32 masters, so
checkpoints do not change. The build pipeline (`train/build.py`) runs `model_converters()` on the meta model,
before expert parallelism.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Protocol

import torch
from torch import nn

from train.config import Fp8Recipe, PrecisionConfig

DEFAULT_FP8_RECIPE = Fp8Recipe.tensorwise  # precision.name=fp8 without a recipe (configs/precision/fp8.yaml sets it)


@dataclass
class Precision:
    name: str
    device: torch.device
    recipe: Optional[Fp8Recipe] = None  # fp8 only

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"fp32": None, "bf16": torch.bfloat16, "fp8": torch.bfloat16}[self.name]

    def autocast(self):
        """Context manager for forward passes (training and validation)."""
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def model_converters(self) -> list["ModelConverter"]:
        """The module conversions this recipe needs, in the order the build pipeline applies them (fp8: one)."""
        if self.name != "fp8":
            return []
        from train.precision.fp8 import Fp8Converter

        return [Fp8Converter(self.recipe, self.device)]


class ModelConverter(Protocol):
    """Swaps a built model's modules in place, on the meta device or materialised, keeping every Parameter
    (names, state-dict keys and the optimizer's view unchanged); returns a one-line report for the run log."""

    def convert(self, model: nn.Module) -> str: ...


def build_precision(cfg: PrecisionConfig, device: torch.device) -> Precision:
    if cfg.name not in ("fp32", "bf16", "fp8"):
        raise ValueError(f"precision.name={cfg.name!r}: choose fp32, bf16 or fp8")
    if cfg.recipe is not None and cfg.name != "fp8":
        raise ValueError(f"precision.recipe={Fp8Recipe(cfg.recipe).value} only applies to precision=fp8")
    recipe = Fp8Recipe(cfg.recipe or DEFAULT_FP8_RECIPE) if cfg.name == "fp8" else None
    return Precision(name=cfg.name, device=device, recipe=recipe)
