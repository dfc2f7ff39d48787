"""Sparse upcycling (Komatsuzaki et al., 2022): a dense checkpoint becomes an MoE checkpoint whose experts are
copies of the dense feed-forward and whose router is fresh.

    upcycle(SRC, OUT, ["model.moe.num_experts=8", "model.moe.top_k=2", "model.moe.granularity=2"])

SRC is a checkpoint of ours whose layers are all dense (`moe.first_k_dense >= num_layers`: our models have no
dense family, a dense model is one before its first MoE layer), or a dense Llama/Mistral Hugging Face folder
(`train/hf/llama.py`, which reads it as such a model of the `mixtral` family). OUT is a complete checkpoint
(`model.safetensors`, `config.yaml`, `tokenizer/`) for `trainer.init_from`, `train.generate` and export.

Shape legend: D model dim, F dense hidden width, m granularity, N expert copies, E = m·N routed experts,
Fm = F/m expert width.

Granular upcycling (granularity m > 1, DeepSeekMoE's fine-grained segmentation, listed as future work by
Megatron): the FFN's hidden dimension is cut into m slices, and since a SwiGLU is a sum over its hidden units,
the m slices sum to the FFN. Expert c·m + j is slice j of copy c, its down projection scaled by m. The router is
drawn once per copy (normal(0, init_std)) and repeated over the copy's m slices, so every token scores the m
slices of a copy alike and top-(m·K) selects K whole copies. With gate weights that sum to one (each of the m
slices of copy c weighs p_c, m·Σ p_c = 1), the output is
    Σ_c Σ_j p_c · m · slice_j(x) = m · Σ_c p_c · FFN(x) = FFN(x),
so the first forward of the upcycled model equals the dense model's whenever `equality_conditions` returns
nothing. At m = 1 this is plain upcycling: K copies of the FFN whose gate weights sum to one. Training breaks the
symmetry at once (the slices compute different functions, so each slice's router row gets its own gradient).

`noise_std` > 0 perturbs each expert copy multiplicatively, W · (1 + ε), ε ~ normal(0, noise_std²) drawn per
element and per expert, so the copies differ from the start (and the first forward no longer equals the dense
model's exactly).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from train.config import ModelConfig, TrainConfig
from train.hf import folders, llama, weights
from train.hf.errors import HFConversionError
from train.hf.weights import StateDict
from train.hf.convert import expected_state, published_config

log = logging.getLogger(__name__)

# Fields the MoE model must share with its dense source: they shape the weights that are copied as they are.
ARCHITECTURE = ("vocab_size", "d_model", "num_layers", "norm", "norm_eps", "dense_hidden", "tie_embeddings",
                "attention", "rope", "mtp_depth", "family")


class UpcycleError(HFConversionError):
    """A source or target shape that cannot be upcycled, saying why and what would work."""


def read_dense(src) -> tuple[TrainConfig, StateDict, Optional[Path], str]:
    """(config, our dense state dict, tokenizer dir or None, what it was) of a dense checkpoint of ours or a
    dense HF folder. Raises UpcycleError for a source with MoE layers."""
    src = Path(src)
    if (src / "config.json").is_file():
        return _read_hf(src)
    from train.checkpoint import load_model

    cfg, state, tokenizer_dir = load_model(src)
    moe_layers = [i for i in range(cfg.model.num_layers + cfg.model.mtp_depth) if cfg.model.is_moe_layer(i)]
    if moe_layers:
        raise UpcycleError(f"{src} is not a dense checkpoint: layers {moe_layers} are MoE. Upcycling starts from "
                           "a model whose layers are all dense (model.moe.first_k_dense >= model.num_layers)")
    return cfg, state, tokenizer_dir, "moeforge dense checkpoint"


def _read_hf(src: Path) -> tuple[TrainConfig, StateDict, Optional[Path], str]:
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(str(src))
    llama.check_model_type(hf_config.model_type, str(src))
    cfg = published_config(llama.BASE_CONFIG)
    llama.model_config(hf_config, cfg)
    cfg.name, cfg.family = f"upcycled_{hf_config.model_type}", "mixtral"
    state = llama.from_hf(cfg, folders.read_hf_weights(src), hf_config.model_type)
    weights.check_shapes(expected_state(cfg), state, f"{src} does not match its config.json")
    return TrainConfig(model=cfg), state, src, f"HF {hf_config.model_type}"


def moe_config(dense: ModelConfig, overrides: Sequence[str] = ()) -> ModelConfig:
    """The MoE model of `dense` with the `model.*` overrides applied: every layer MoE and experts as wide as the
    dense FFN unless the overrides say otherwise; the architecture fields must stay the source's."""
    cfg = copy.deepcopy(dense)
    cfg.moe.first_k_dense, cfg.moe.layer_freq = 0, 1
    cfg.moe.expert_hidden, cfg.moe.granularity, cfg.moe.num_shared_experts = dense.dense_hidden, 1, 0
    bad = [o for o in overrides if not o.lstrip("+").startswith("model.")]
    if bad:
        raise UpcycleError(f"only model.* overrides choose the MoE shape; got {bad}")
    node = OmegaConf.structured(cfg)
    try:
        node = OmegaConf.merge(node, OmegaConf.from_dotlist([o.lstrip("+")[len("model."):] for o in overrides]))
        cfg = OmegaConf.to_object(node)
    except OmegaConfBaseException as e:
        raise UpcycleError(f"bad model override: {e}") from None
    for name in ARCHITECTURE:
        if getattr(cfg, name) != getattr(dense, name):
            raise UpcycleError(f"model.{name} differs from the dense source ({getattr(cfg, name)} vs "
                               f"{getattr(dense, name)}): upcycling copies those weights as they are")
    m, F = cfg.moe, dense.dense_hidden
    if m.expert_hidden != F:
        raise UpcycleError(f"shape mismatch: model.moe.expert_hidden={m.expert_hidden} but the dense FFN is {F} "
                           "wide; experts are copies of it (use model.moe.granularity to make them narrower)")
    if m.granularity < 1 or F % m.granularity:
        raise UpcycleError(f"model.moe.granularity={m.granularity} must divide the dense FFN width {F}")
    if m.num_shared_experts:
        raise UpcycleError("model.moe.num_shared_experts > 0 is not supported: an always-active copy of the FFN "
                           "would add to the routed ones")
    return cfg


def equality_conditions(cfg: ModelConfig, noise_std: float = 0.0) -> list[str]:
    """Why the upcycled model's first forward would differ from the dense model's; empty when it equals it.
    Equal means: gate weights summing to one over whole copies of the FFN, nothing dropped, no noise."""
    m, why = cfg.moe, []
    if not (m.scoring == "topk_softmax" or m.norm_topk_prob):
        why.append(f"moe.scoring={m.scoring} without norm_topk_prob: the gate weights do not sum to one")
    if m.routed_scaling_factor != 1.0:
        why.append(f"moe.routed_scaling_factor={m.routed_scaling_factor} scales the gate weights")
    if m.capacity_factor is not None or m.device_capacity_factor is not None:
        why.append("a capacity factor may drop token copies")
    for groups, what in ((m.num_groups, "moe.num_groups"), (m.routing_groups, "moe.routing_groups")):
        if groups and (m.num_routed_experts // groups) % m.granularity:
            why.append(f"{what}={groups} splits the m={m.granularity} slices of a copy across groups")
    if noise_std > 0:
        why.append(f"noise {noise_std} perturbs the expert copies")
    return why


def upcycle_state(cfg: ModelConfig, dense: StateDict, noise_std: float = 0.0, seed: int = 0) -> StateDict:
    """The MoE state dict: dense weights copied, each MoE layer's experts and router built from the dense FFN
    at the same prefix (main layers and MTP blocks alike), everything else the model holds (the V3 expert bias)
    zero. Raises UpcycleError when a tensor is missing or left over."""
    expected = expected_state(cfg)
    m, n = cfg.moe.granularity, cfg.moe.num_experts
    gen = torch.Generator().manual_seed(seed)
    dense = dict(dense)
    out: StateDict = {}
    for key, like in expected.items():
        if key.endswith("ffn.router.gate.weight"):
            prefix = key[: -len("router.gate.weight")]
            ffn = {name: dense.pop(f"{prefix}w_{name}.weight", None) for name in ("gate", "up", "down")}
            missing = [f"{prefix}w_{k}.weight" for k, v in ffn.items() if v is None]
            if missing:
                raise UpcycleError(f"the dense source has no FFN at {missing}")
            out.update(_experts(prefix, ffn["gate"], ffn["up"], ffn["down"], m, n, noise_std, gen))
            g_ND = torch.empty(n, like.shape[1]).normal_(0.0, cfg.init_std, generator=gen)
            out[key] = g_ND.repeat_interleave(m, dim=0).to(ffn["gate"].dtype)
        elif ".ffn.experts." in key:
            continue  # written with the router
        elif key in dense:
            out[key] = dense.pop(key)
        elif key.endswith("expert_bias_E"):
            out[key] = torch.zeros(like.shape)
        else:
            raise UpcycleError(f"the dense source has no tensor for {key}")
    if cfg.tie_embeddings:
        dense.pop("lm_head.weight", None)
    if dense:
        raise UpcycleError(f"{len(dense)} tensors of the dense source have no place in the MoE model: "
                           f"{sorted(dense)[:5]}")
    weights.check_shapes(expected, out, "upcycled weights")
    return out


def _experts(prefix: str, w_gate_FD, w_up_FD, w_down_DF, m: int, n: int, noise_std: float, gen) -> StateDict:
    """Stacked experts: expert c·m + j is slice j (of m along F) of copy c, down projection times m."""
    F = w_gate_FD.shape[0]
    Fm = F // m

    def stack(w_FX: torch.Tensor, scale: float) -> torch.Tensor:
        slices_mFX = w_FX.reshape(m, Fm, -1) * scale
        w_EFX = slices_mFX.repeat(n, 1, 1)  # copy-major: index c·m + j
        if noise_std > 0:
            w_EFX = w_EFX * (1.0 + noise_std * torch.randn(w_EFX.shape, generator=gen, dtype=torch.float32)
                             ).to(w_EFX.dtype)
        return w_EFX

    gate_EFD, up_EFD = stack(w_gate_FD, 1.0), stack(w_up_FD, 1.0)  # noise drawn gate, up, down, in that order
    down_EDF = stack(w_down_DF.t(), float(m)).transpose(1, 2)
    return {
        f"{prefix}experts.w_gate_up_EHD": torch.cat([gate_EFD, up_EFD], dim=1).contiguous(),
        f"{prefix}experts.w_down_EDF": down_EDF.contiguous(),
    }


def upcycle(src, out, overrides: Sequence[str] = (), noise_std: float = 0.0, seed: int = 0) -> Path:
    """Write the complete MoE checkpoint `out` upcycled from the dense `src` (see the module docstring)."""
    from train.checkpoint import mark_complete, save_model

    train_cfg, dense, tokenizer_src, what = read_dense(src)
    cfg = moe_config(train_cfg.model, overrides)
    cfg.name = f"{cfg.name}_upcycled" if not cfg.name.startswith("upcycled") else cfg.name
    state = upcycle_state(cfg, dense, noise_std, seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = Path(tmp) / "tokenizer"
        has_tokenizer = folders.copy_tokenizer_files(tokenizer_src, tokenizer_dir)
        save_model(out, dataclasses.replace(train_cfg, model=cfg), state, tokenizer_dir if has_tokenizer else None)
    mark_complete(out)
    m = cfg.moe
    log.info("upcycled %s (%s) to %s: %d experts of width %d, top %d, granularity %d%s", src, what, out,
             m.num_routed_experts, m.routed_hidden, m.num_active_routed, m.granularity,
             "" if has_tokenizer else " (no tokenizer)")
    why = equality_conditions(cfg, noise_std)
    if why:
        log.warning("the first forward will differ from the dense model's: %s", "; ".join(why))
    else:
        log.info("the first forward equals the dense model's (whole copies chosen, gate weights sum to one)")
    return Path(out)
