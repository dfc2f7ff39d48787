"""Every choice field of the typed config is one of these enums, so Hydra rejects a typo at composition with
OmegaConf's message listing the allowed values.

Each is a `str` enum whose member names equal their values: `x == "bf16"` holds, `f"{x}"` and `str(x)` give the
value, `json.dumps` writes the plain string, and a config.yaml written with plain strings (before these enums)
loads onto the schema unchanged.
"""
from __future__ import annotations

import enum


class Choice(str, enum.Enum):
    """Base of the config enums: formats as its value (not `Class.member`)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def __repr__(self) -> str:  # messages quote a value with !r: 'bf16', as before these enums
        return repr(self.value)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


# ---- model ----
class Family(Choice):
    """The published architecture a config follows: selects HF conversion and defaults, never a code path."""

    mixtral = "mixtral"
    dbrx = "dbrx"
    deepseek_moe = "deepseek_moe"
    deepseek_v2 = "deepseek_v2"
    deepseek_v3 = "deepseek_v3"
    qwen2_moe = "qwen2_moe"
    qwen3_moe = "qwen3_moe"
    olmoe = "olmoe"
    grok = "grok"
    openmoe = "openmoe"
    llama4 = "llama4"
    llama4_text = "llama4_text"  # a Llama 4 imported from HF (its model_type), the same converter as llama4


class Norm(Choice):
    rmsnorm = "rmsnorm"
    layernorm = "layernorm"  # without bias (DBRX)


class FfnActivation(Choice):
    silu = "silu"  # SwiGLU
    gelu_tanh = "gelu_tanh"  # GeGLU with tanh-approximated GELU (Grok-1)


class AttentionKind(Choice):
    gqa = "gqa"
    mla = "mla"


class QkNorm(Choice):
    head = "head"  # one RMSNorm over each head's Dh channels (Qwen3)
    full = "full"  # one RMSNorm over the whole projection (OLMoE)


class RopeScalingType(Choice):
    yarn = "yarn"


class Scoring(Choice):
    softmax_topk = "softmax_topk"
    topk_softmax = "topk_softmax"
    sigmoid = "sigmoid"


class GroupScore(Choice):
    max = "max"
    top2_sum = "top2_sum"


class RouterScheme(Choice):
    topk = "topk"
    noisy_topk = "noisy_topk"
    switch = "switch"
    gshard = "gshard"
    expert_choice = "expert_choice"
    base = "base"
    hash = "hash"


# ---- around the model ----
class Backend(Choice):
    auto = "auto"
    nccl = "nccl"
    gloo = "gloo"


class A2aDtype(Choice):
    """What the expert-parallel dispatch all-to-all sends token rows as: the compute dtype, or FP8 e4m3 with
    1×128 tile scales (DeepSeek-V3); the combine always returns the compute dtype."""

    auto = "auto"
    fp8 = "fp8"


# Pipeline schedules (`parallel.pp_schedule`; train/config/pipeline.py). Built with the functional API because a
# member's name must equal its value (OmegaConf looks members up by name) and `1f1b` is no identifier:
#   1f1b: Narayanan et al. 2021 (PipeDream-Flush, Megatron's 1F1B);
#   interleaved_1f1b: Megatron's interleaved 1F1B, `parallel.pp_virtual_stages` model chunks per rank;
#   zero_bubble: Qi et al. 2024 (ZB-H2), the bubble filled by deferred weight-gradient passes.
PpSchedule = Choice("PpSchedule", [(v, v) for v in ("1f1b", "interleaved_1f1b", "zero_bubble")])


class Precision(Choice):
    fp32 = "fp32"
    bf16 = "bf16"  # bf16 compute end to end, fp32 masters (train/precision/bf16.py)
    bf16_autocast = "bf16_autocast"  # bf16 autocast over fp32 weights
    fp8 = "fp8"


class Fp8Recipe(Choice):
    """FP8 scaling granularity (train/precision/fp8/): one scale per tensor; one per row (torchao's rowwise,
    power-of-2 scales); DeepSeek-V3's 1x128 activation tiles and 128x128 weight blocks."""

    tensorwise = "tensorwise"
    rowwise = "rowwise"
    blockwise = "blockwise"


class DataSource(Choice):
    stdlib = "stdlib"
    hf = "hf"
    files = "files"
    tokens = "tokens"


class OptimName(Choice):
    adamw = "adamw"


class Schedule(Choice):
    cosine = "cosine"
    wsd = "wsd"
    constant = "constant"


class Device(Choice):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class ActivationCheckpointing(Choice):
    none = "none"
    full = "full"
    selective = "selective"


# What a run does after a checkpoint save fails (a full disk, a file-size limit, an I/O error): auto continues when
# an earlier complete checkpoint exists and stops when there is none. Built with the functional API because
# `continue` is a keyword and OmegaConf matches members by name (OnSaveError["continue"]).
OnSaveError = Choice("OnSaveError", [("auto", "auto"), ("continue", "continue"), ("stop", "stop")])


class WandbMode(Choice):
    disabled = "disabled"
    offline = "offline"
    online = "online"
