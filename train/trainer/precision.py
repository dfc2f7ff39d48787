"""The mixed-precision recipe, in one place.

Parameters, gradients and optimizer state are always fp32 (master weights). `bf16` runs the forward pass
under autocast to bfloat16; the model itself keeps the router, softmax, norms and losses in fp32. `fp8` autocasts
the same way and, once the model is built, `prepare_model` converts its attention/MLP/shared-expert linears and
routed-expert GEMMs to FP8 with `precision.recipe`'s scaling (train/trainer/fp8/); their Parameters stay the fp32
masters, so checkpoints do not change.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

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

    def prepare_model(self, model: nn.Module) -> Optional[str]:
        """Apply the recipe's module conversions to a built, materialised model in place (fp8 only; before the
        optimizer and compile/ZeRO wrap it); returns a one-line report for the run log, or None."""
        if self.name != "fp8":
            return None
        from train.trainer.fp8 import convert_to_fp8

        return convert_to_fp8(model, self.recipe, self.device).summary()


def build_precision(cfg: PrecisionConfig, device: torch.device) -> Precision:
    if cfg.name not in ("fp32", "bf16", "fp8"):
        raise ValueError(f"precision.name={cfg.name!r}: choose fp32, bf16 or fp8")
    if cfg.recipe is not None and cfg.name != "fp8":
        raise ValueError(f"precision.recipe={Fp8Recipe(cfg.recipe).value} only applies to precision=fp8")
    recipe = Fp8Recipe(cfg.recipe or DEFAULT_FP8_RECIPE) if cfg.name == "fp8" else None
    return Precision(name=cfg.name, device=device, recipe=recipe)
