"""The mixed-precision recipe, in one place: autocast for forward passes, and the model converters it needs.

Parameters, gradients and optimizer state are always fp32 (master weights), and checkpoints hold them.
- `bf16`: bf16 compute end to end (`bf16.py`): its converter makes linears, embeddings and expert stacks compute
  with bf16 copies of the fp32 masters, cast once per optimizer step, so activations and the residual stream
  are bf16; routers, the expert bias, norm statistics and losses stay fp32. No autocast. Every ZeRO stage.
- `bf16_autocast`: the forward pass under autocast to bfloat16 over fp32 weights (matmuls in bf16, residual
  stream fp32); the model itself keeps the router, softmax, norms and losses in fp32. Every ZeRO stage.
- `fp8` builds on `bf16`: its converter runs first (bf16 residual stream, fp32 routers and norms, no autocast),
  then `Fp8Converter` (`fp8/`) puts the attention/MLP/shared-expert linears and routed-expert GEMMs in FP8 with
  `precision.recipe`'s scaling (they quantise the bf16 inputs and the fp32 masters, or the experts' cached bf16
  copies, and return bf16); embedding, output head, routers, norms and MTP stay as `bf16` runs them. The
  Parameters stay the fp32 masters, so checkpoints do not change.
The build pipeline (`train/build.py`) runs `model_converters()` on the meta model, before expert parallelism.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Protocol

import torch
from torch import nn

from train.config import Fp8Recipe, PrecisionConfig

NAMES = ("fp32", "bf16", "bf16_autocast", "fp8")
DEFAULT_FP8_RECIPE = Fp8Recipe.tensorwise  # precision.name=fp8 without a recipe (configs/precision/fp8.yaml sets it)


@dataclass
class Precision:
    name: str
    device: torch.device
    recipe: Optional[Fp8Recipe] = None  # fp8 only

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"fp32": None, "bf16": None, "bf16_autocast": torch.bfloat16, "fp8": None}[self.name]

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype matmuls run in (FP8's GEMMs aside): what MFU and the planner count."""
        return torch.float32 if self.name == "fp32" else torch.bfloat16

    def autocast(self):
        """Context manager for forward passes (training and validation)."""
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def model_converters(self) -> list["ModelConverter"]:
        """The module conversions this recipe needs, in the order the build pipeline applies them (bf16: one;
        fp8: bf16's, then the FP8 swap of the linears and expert GEMMs it leaves bf16)."""
        if self.name not in ("bf16", "fp8"):
            return []
        from train.precision.bf16 import Bf16Converter

        if self.name == "bf16":
            return [Bf16Converter()]
        from train.precision.fp8 import Fp8Converter

        return [Bf16Converter(), Fp8Converter(self.recipe, self.device)]


class ModelConverter(Protocol):
    """Swaps a built model's modules in place, on the meta device or materialised, keeping every Parameter
    (names, state-dict keys and the optimizer's view unchanged); returns a one-line report for the run log."""

    def convert(self, model: nn.Module) -> str: ...


def build_precision(cfg: PrecisionConfig, device: torch.device) -> Precision:
    if cfg.name not in NAMES:
        raise ValueError(f"precision.name={cfg.name!r}: choose {', '.join(NAMES)}")
    if cfg.recipe is not None and cfg.name != "fp8":
        raise ValueError(f"precision.recipe={Fp8Recipe(cfg.recipe).value} only applies to precision=fp8")
    recipe = Fp8Recipe(cfg.recipe or DEFAULT_FP8_RECIPE) if cfg.name == "fp8" else None
    return Precision(name=cfg.name, device=device, recipe=recipe)

