"""`convert_to_fp8(model, recipe, device) -> Fp8Report`: put a built model's GEMMs in FP8, in place.

Which layers (DeepSeek-V3's split): the dense `nn.Linear`s of attention, dense MLPs and shared experts run in
FP8, and the routed experts get an FP8 `GroupedExperts.gemm`. The embedding, the output head, every router
linear (gate, noise), the shared-expert gate, the norms and everything inside an MTP module stay in bf16/fp32,
as does a linear whose in or out features are not a multiple of 16 (torchao's kernels need that).

How: tensorwise and rowwise dense linears become torchao `Float8Linear`s (`convert_to_float8_training` with
`Float8LinearConfig.from_recipe_name`; `torch._scaled_mm` runs on CPU and CUDA); blockwise ones become torchao's
`Float8BlockwiseLinear` on CUDA sm90+ (when it imports and both dims are multiples of 128), else
`EmulatedFp8Linear`. Every swap reuses the linear's own Parameters: names, state-dict keys, the optimizer's view
and fp32 master weights are unchanged. The model code never learns about FP8.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from train.config import Fp8Recipe
from train.model.moe.experts import GroupedExperts
from train.model.moe.layer import MoELayer
from train.model.moe.router import Router
from train.model.mtp import MTPModule
from train.model.norms import LayerNorm, RMSNorm
from train.precision.fp8.emulated import EmulatedFp8Linear
from train.precision.fp8.grouped import Fp8GroupedGemm, is_sm90

ALIGN = 16


@dataclass
class Fp8Report:
    """What `convert_to_fp8` did: converted linears by kernel, experts converted, and what stayed high precision
    (reason -> module names)."""

    recipe: Fp8Recipe
    linears: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # kernel -> names
    experts: list[str] = field(default_factory=list)
    expert_kernel: str = ""
    kept: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # reason -> names

    @property
    def converted(self) -> list[str]:
        return [name for names in self.linears.values() for name in names]

    def summary(self) -> str:
        """One line for the run log."""
        parts = [f"{len(names)} linears -> {kernel}" for kernel, names in self.linears.items()]
        if self.experts:
            parts.append(f"{len(self.experts)} expert stacks -> {self.expert_kernel}")
        kept = ", ".join(f"{len(names)} norms" if reason == "norms" else f"{reason} ({_short(names)})"
                         for reason, names in self.kept.items())
        return f"fp8 recipe={self.recipe.value}: {', '.join(parts) or 'nothing converted'}; kept high precision: {kept}"


def _short(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f" +{len(names) - limit} more" if len(names) > limit else "")


def _kept_reason(model: nn.Module, name: str, module: nn.Module, owners: dict[str, str]) -> str | None:
    """Why the linear `name` stays high precision, or None when it converts."""
    for prefix, reason in owners.items():
        if name == prefix or name.startswith(prefix + "."):
            return reason
    if module is getattr(model, "lm_head", None):
        return "output head"
    if module.in_features % ALIGN or module.out_features % ALIGN:
        return f"dims not multiples of {ALIGN}"
    return None


def _owners(model: nn.Module) -> dict[str, str]:
    """Module names whose whole subtree stays high precision, with the reason."""
    owners = {}
    for name, module in model.named_modules():
        if isinstance(module, MTPModule):
            owners[name] = "MTP module"
        elif isinstance(module, Router):
            owners[name] = "router"
        elif isinstance(module, MoELayer) and module.shared_gate is not None:
            owners[f"{name}.shared_gate"] = "shared-expert gate"
    return owners


def _blockwise_linear(device: torch.device):
    """torchao's blockwise linear class where it can run (CUDA sm90+, triton), else None."""
    if not is_sm90(device):
        return None
    try:
        from torchao.prototype.blockwise_fp8_training.linear import Float8BlockwiseLinear
    except Exception:
        return None
    return Float8BlockwiseLinear


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def convert_to_fp8(model: nn.Module, recipe: Fp8Recipe, device: torch.device) -> Fp8Report:
    """Convert `model` in place; returns the report. Call once, before the optimizer and any compile/ZeRO
    wrapping. The build pipeline calls it on the meta model (each swap reuses the linear's Parameters, so
    materialising afterwards allocates and initialises them under the same names); a materialised,
    expert-parallel or activation-checkpointed model converts the same way."""
    recipe = Fp8Recipe(recipe)
    report = Fp8Report(recipe)
    owners = _owners(model)
    chosen = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            report.kept["embedding"].append(name)
        elif isinstance(module, nn.Linear):
            reason = _kept_reason(model, name, module, owners)
            if reason is None:
                chosen.append(name)
            else:
                report.kept[reason].append(name)
        elif isinstance(module, GroupedExperts):
            reason = next((r for p, r in owners.items() if name.startswith(p + ".")), None)
            if reason is None and any(d % ALIGN for p in module.parameters() for d in p.shape[1:]):
                reason = f"dims not multiples of {ALIGN}"
            if reason is not None:
                report.kept[reason].append(name)
                continue
            module.gemm = Fp8GroupedGemm(recipe, device)
            report.experts.append(name)
            report.expert_kernel = module.gemm.kernel
        elif isinstance(module, (RMSNorm, LayerNorm, nn.LayerNorm)):
            report.kept["norms"].append(name)

    if recipe is Fp8Recipe.blockwise:
        torchao_cls = _blockwise_linear(torch.device(device))
        for name in chosen:
            linear = model.get_submodule(name)
            if torchao_cls is not None and linear.bias is None and linear.in_features % 128 == 0 \
                    and linear.out_features % 128 == 0:
                _swap(model, name, torchao_cls.from_float(linear))
                report.linears["torchao Float8BlockwiseLinear"].append(name)
            else:
                _swap(model, name, EmulatedFp8Linear.from_linear(linear, recipe))
                report.linears["emulated blockwise linear (1x128 x 128x128)"].append(name)
        return report

    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    selected = set(chosen)
    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe.value),
                               module_filter_fn=lambda module, fqn: fqn in selected)
    report.linears["torchao Float8Linear (torch._scaled_mm)"] = chosen
    return report


@dataclass
class Fp8Converter:
    """`precision=fp8`'s model converter (`train.precision.ModelConverter`): `convert_to_fp8` with the run's
    recipe; `device` is where the model will run (it picks the kernels), not where it is now."""

    recipe: Fp8Recipe
    device: torch.device

    def convert(self, model: nn.Module) -> str:
        return convert_to_fp8(model, self.recipe, self.device).summary()
