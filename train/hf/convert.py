"""Export a moeforge checkpoint as a Hugging Face model folder, and import one as a moeforge checkpoint.

    export CKPT OUT   CKPT: run dir (newest complete checkpoint) or one checkpoint. OUT: config.json,
                      model.safetensors, generation_config.json and the tokenizer files, loadable with
                      AutoModelForCausalLM / AutoTokenizer.
    import HF_DIR OUT HF_DIR: config.json + safetensors of a Mixtral, DBRX, DeepSeek-V2/V3, Qwen2-MoE (Qwen1.5-MoE),
                      Qwen3-MoE or OLMoE model.
                      OUT: a complete checkpoint (model.safetensors, config.yaml, tokenizer/) that
                      `trainer.init_from=OUT` starts from.

The family modules own the mappings; this file picks the module, validates shapes against the model our
config builds, and does the file I/O.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Dict

import torch
from omegaconf import OmegaConf

from train.config import CONFIG_DIR, ModelConfig, TrainConfig
from train.hf import dbrx, deepseek, errors, expert_layout, folders, llama4, mixtral, qwen_olmoe, weights
from train.hf.errors import HFConversionError
from train.hf.weights import StateDict

log = logging.getLogger(__name__)

MODULES: Dict[str, ModuleType] = {f: mod for mod in (mixtral, dbrx, deepseek, qwen_olmoe, llama4)
                                  for f in mod.FAMILIES}
MODEL_TYPES: Dict[str, ModuleType] = {"mixtral": mixtral, "dbrx": dbrx, "deepseek_v2": deepseek,
                                      "deepseek_v3": deepseek, "qwen2_moe": qwen_olmoe, "qwen3_moe": qwen_olmoe,
                                      "olmoe": qwen_olmoe, "llama4_text": llama4}
SUPPORTED = "mixtral (MixtralForCausalLM), dbrx (DbrxForCausalLM), deepseek_v2 (DeepseekV2ForCausalLM), " \
            "deepseek_v3 (DeepseekV3ForCausalLM), qwen2_moe (Qwen2MoeForCausalLM), qwen3_moe " \
            "(Qwen3MoeForCausalLM), olmoe (OlmoeForCausalLM), llama4_text (Llama4ForCausalLM)"
_DEEPSEEK_MOE = ("DeepSeekMoE (family 'deepseek_moe', HF model_type 'deepseek') has no native transformers class "
                 "(its checkpoints need trust_remote_code)")


# The transformers classes whose weights the converters read (config.json's `architectures`).
ARCHITECTURES = {"MixtralForCausalLM", "DbrxForCausalLM", "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM",
                 "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM", "Llama4ForCausalLM"}


def check_hf_config(hf_dir: Path) -> None:
    """One line, before transformers reads the folder: it asks for no remote code, its `model_type` is one we
    import and its `architectures` (when given) name a class whose weights we convert (a classification or
    vision head would not fit)."""
    folders.refuse_remote_code(hf_dir, "model folder")
    config = json.loads((Path(hf_dir) / "config.json").read_text())
    if not isinstance(config, dict):
        raise HFConversionError(f"{hf_dir}/config.json is not a JSON object: not a Hugging Face model folder")
    module_for_model_type(str(config.get("model_type")))
    archs = config.get("architectures") or []
    if archs and not set(archs) & ARCHITECTURES:
        raise HFConversionError(f"{hf_dir}/config.json names the class(es) {archs}, which moeforge does not convert "
                                f"(supported: {SUPPORTED})")


def module_for_family(family: str) -> ModuleType:
    if family == "deepseek_moe":
        raise HFConversionError(f"cannot convert: {_DEEPSEEK_MOE}. Supported families: {SUPPORTED}")
    if family not in MODULES:
        raise HFConversionError(f"cannot convert model family {family!r}. Supported families: {SUPPORTED}")
    return MODULES[family]


def module_for_model_type(model_type: str) -> ModuleType:
    if model_type == "deepseek":
        raise HFConversionError(f"cannot import: {_DEEPSEEK_MOE}. Supported model types: {SUPPORTED}")
    if model_type not in MODEL_TYPES:
        raise HFConversionError(f"cannot import HF model_type {model_type!r}. Supported model types: {SUPPORTED}")
    return MODEL_TYPES[model_type]


def flatten_granularity(cfg: ModelConfig) -> ModelConfig:
    """The same model stated at granularity 1: routed experts, active experts and expert width are the derived
    values, which is how HF configs state them (shared width = num_shared x routed width either way)."""
    m = cfg.moe
    moe = dataclasses.replace(m, num_experts=m.num_routed_experts, top_k=m.num_active_routed,
                              expert_hidden=m.routed_hidden, granularity=1)
    return dataclasses.replace(cfg, moe=moe)


def expected_state(cfg: ModelConfig) -> StateDict:
    """Names and shapes of `MoETransformer(cfg).state_dict()`: the build pipeline's meta model (no memory)."""
    from train.build import meta_model

    return meta_model(cfg).state_dict()


def published_config(name: str) -> ModelConfig:
    """`configs/model/<name>.yaml` as a typed ModelConfig (full-size configs have no defaults list)."""
    stored = OmegaConf.load(Path(CONFIG_DIR) / "model" / f"{name}.yaml")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), stored))


# ---------------------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------------------


DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # what `save_pretrained` writes per shard by default ("5GB")


def export_checkpoint(ckpt, out, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write the HF folder `out` for the checkpoint (or a run dir's newest checkpoint) `ckpt`, either format
    (sharded `state/` or `model.safetensors`).

    Streaming: the weights are read one block at a time (the model's global tensors, then each layer, then each
    MTP module), converted and written, so the host holds one block and its HF tensors, never the model twice.
    The family's `to_hf` runs on the block's real tensors with every other tensor on the meta device (free);
    only outputs computed from real tensors are written. Past `max_shard_bytes` the weights go to
    `model-0000i-of-0000N.safetensors` shards with a `model.safetensors.index.json`, as `save_pretrained` does."""
    from train import checkpoint as ckpt_io

    ckpt_dir = ckpt_io.resolve_checkpoint(ckpt)
    ckpt_io.verify_checkpoint(ckpt_dir, only=ckpt_io.weight_files(ckpt_dir))
    train_cfg = ckpt_io.load_config(ckpt_dir)
    tokenizer_dir = ckpt_dir / ckpt_io.TOKENIZER_DIR
    cfg = train_cfg.model
    module = module_for_family(cfg.family)
    expected = expected_state(cfg)
    shapes = ckpt_io.weight_shapes(ckpt_dir)
    if cfg.tie_embeddings and "embed.weight" in shapes:
        shapes.setdefault("lm_head.weight", shapes["embed.weight"])
    weights.check_shapes(expected, {k: torch.empty(v, device="meta") for k, v in shapes.items()},
                        f"checkpoint {ckpt} does not match its config.yaml")
    flat = flatten_granularity(cfg)
    errors.require(cfg.moe.router == "topk", cfg.family,
                   f"model.moe.router={cfg.moe.router}: the Hugging Face classes route by token-choice top-k only")
    errors.require(cfg.ffn_activation == "silu", cfg.family, f"ffn_activation={cfg.ffn_activation!r} (every "
                   "supported HF class has SwiGLU experts)")
    module.check_exportable(flat)
    hf_config = module.hf_config(flat)
    hf_config.dtype = _common_dtype(ckpt_io.weight_dtypes(ckpt_dir))

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HFConversionError(f"export target {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    has_tokenizer = folders.copy_tokenizer_files(tokenizer_dir if tokenizer_dir.is_dir() else None, out)
    if has_tokenizer:
        _set_special_tokens(hf_config, out)
    hf_config.save_pretrained(str(out))
    _save_generation_config(hf_config, out)
    writer = folders.ShardedSafetensorsWriter(out, max_shard_bytes)
    stored = ckpt_io.weight_names(ckpt_dir)  # a sharded checkpoint stores a tied head once, as embed.weight
    for block in _blocks(stored):
        real = dict(ckpt_io.iter_weights(ckpt_dir, block))
        if cfg.tie_embeddings and "embed.weight" in real:
            real["lm_head.weight"] = real["embed.weight"]
        for key, value in module.to_hf(flat, expert_layout.split_experts({**expected, **real})).items():
            if not value.is_meta:
                writer.add(key, value)
        del real
    writer.finish()
    log.info("exported %s (%s) to %s%s", ckpt, cfg.family, out, "" if has_tokenizer else " (no tokenizer)")
    return out


def _blocks(names: list[str]) -> list[list[str]]:
    """Our weight names grouped as the export streams them: per layer, per MTP module, the rest first."""
    groups: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".")
        key = ".".join(parts[:2]) if parts[0] in ("layers", "mtp") and len(parts) > 2 else ""
        groups.setdefault(key, []).append(name)
    return [groups[k] for k in groups]


def _common_dtype(dtypes) -> torch.dtype:
    floats = {d for d in dtypes if d.is_floating_point}
    return floats.pop() if len(floats) == 1 else torch.float32


def _set_special_tokens(hf_config, tokenizer_dir: Path) -> None:
    """bos/eos/pad ids from the tokenizer, so generation stops where the tokenizer says."""
    from transformers import AutoTokenizer

    folders.refuse_remote_code(tokenizer_dir, "tokenizer")
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    hf_config.bos_token_id, hf_config.eos_token_id = tok.bos_token_id, tok.eos_token_id
    hf_config.pad_token_id = tok.pad_token_id


def _save_generation_config(hf_config, out: Path) -> None:
    from transformers import GenerationConfig

    gen = GenerationConfig(bos_token_id=hf_config.bos_token_id, eos_token_id=hf_config.eos_token_id,
                           pad_token_id=hf_config.pad_token_id)
    gen.save_pretrained(str(out))


# ---------------------------------------------------------------------------------------------------------
# import
# ---------------------------------------------------------------------------------------------------------


def import_checkpoint(hf_dir, out) -> Path:
    """Write a complete moeforge checkpoint `out` from the HF folder `hf_dir`."""
    from transformers import AutoConfig

    from train.checkpoint import mark_complete, save_model

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise HFConversionError(f"{hf_dir} has no config.json: pass a Hugging Face model folder")
    check_hf_config(hf_dir)  # before transformers reads it: no remote code, a model class we convert
    hf_config = AutoConfig.from_pretrained(str(hf_dir))
    model_type = hf_config.model_type
    module = module_for_model_type(model_type)
    if getattr(hf_config, "quantization_config", None):
        raise HFConversionError(f"{hf_dir} holds quantized weights ({hf_config.quantization_config}); import "
                                "needs floating-point weights (dequantize them first, e.g. DeepSeek-V3's fp8)")

    base = module.BASE_CONFIG[model_type] if isinstance(module.BASE_CONFIG, dict) else module.BASE_CONFIG
    cfg = published_config(base)
    module.model_config(hf_config, cfg)
    cfg.name, cfg.family = f"imported_{model_type}", model_type
    hf_state = folders.read_hf_weights(hf_dir)
    if model_type == "deepseek_v3":
        cfg.mtp_depth = deepseek.mtp_layers_in(hf_state, cfg.num_layers)  # what the weights actually hold
    state = expert_layout.fuse_experts(module.from_hf(cfg, hf_state))  # the converters speak (E, in, out)
    weights.check_shapes(expected_state(cfg), state, f"{hf_dir} does not match its config.json")

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = Path(tmp) / "tokenizer"
        has_tokenizer = folders.copy_tokenizer_files(hf_dir, tokenizer_dir)
        save_model(out, TrainConfig(model=cfg), state, tokenizer_dir if has_tokenizer else None)
    mark_complete(out)
    log.info("imported %s (%s) to %s%s", hf_dir, model_type, out, "" if has_tokenizer else " (no tokenizer)")
    return Path(out)
