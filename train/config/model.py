"""Typed model configuration: one dataclass per concern, registered with Hydra.

Every field a published architecture needs is here; `configs/model/*.yaml` fill them in. Values that are
derived from others (expert width after fine-grained segmentation, the number of active routed experts, the
attention head size) are computed in exactly one place: the properties below.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from train.config.choices import (
    AttentionKind, FfnActivation, GroupScore, Norm, QkNorm, RopeScalingType, RouterScheme, Scoring,
)


@dataclass
class RopeScalingConfig:
    """RoPE context extension. Only YaRN is used by the published configs (DeepSeek-V2/V3)."""

    type: RopeScalingType = RopeScalingType.yarn
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclass
class RopeConfig:
    theta: float = 10000.0
    # Whether the rotary pairs are adjacent channels (2i, 2i+1) as in DeepSeek's checkpoints, rather than
    # the two halves of the head (i, i + d/2) as in Llama-style checkpoints (Mixtral, DBRX).
    interleaved: bool = False
    scaling: Optional[RopeScalingConfig] = None


@dataclass
class AttentionConfig:
    """Grouped-query attention (`kind=gqa`) or DeepSeek's multi-head latent attention (`kind=mla`)."""

    kind: AttentionKind = AttentionKind.gqa
    num_heads: int = 8
    num_kv_heads: int = 8
    head_dim: Optional[int] = None  # gqa: defaults to d_model // num_heads
    bias: bool = False  # biases on q, k, v and the output projection
    qkv_bias: bool = False  # biases on q, k, v only (Qwen2, Qwen1.5-MoE, Qwen2-MoE)
    clip_qkv: Optional[float] = None  # DBRX clamps q, k, v to [-clip, clip]
    sliding_window: Optional[int] = None  # Mixtral-style local attention; null = full causal
    # Grok-1: attention logits s become cap * tanh(s / cap) before the mask and softmax; null = none.
    logit_softcap: Optional[float] = None
    # Llama 4: layer i has no RoPE when (i + 1) % nope_layer_interval == 0 (NoPE); those layers scale q by
    # 1 + temperature_scale * log(1 + floor((pos + 1) / temperature_floor_scale)) when the floor scale is set;
    # the RoPE layers attend within chunks of `chunk_size` tokens (token i sees j <= i with j // C == i // C).
    nope_layer_interval: Optional[int] = None
    temperature_floor_scale: Optional[float] = None
    temperature_scale: float = 0.1
    chunk_size: Optional[int] = None
    # RMSNorm on the projected queries and keys, before RoPE: `head` normalises each head's Dh channels with one
    # weight shared by all heads (Qwen3), `full` the whole H·Dh (and Hkv·Dh) projection (OLMoE); null = none.
    qk_norm: Optional[QkNorm] = None
    # MLA (DeepSeek-V2/V3). q_lora_rank null = queries are not compressed (V2-Lite).
    q_lora_rank: Optional[int] = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128


@dataclass
class MoEConfig:
    """Mixture-of-Experts feed-forward settings.

    The config states a base shape: `num_experts` routed experts of width `expert_hidden`, `top_k` of them
    active, plus `num_shared_experts` always-active experts of the same width. Fine-grained segmentation
    with `granularity` = m follows DeepSeekMoE: the m·(N + Ks) segments of width F/m keep Ks shared experts
    (now of width F/m each) and route among the other m·(N + Ks) − Ks, choosing m·(K + Ks) − Ks of them, so
    total and active expert parameters stay constant across a sweep over m. At m = 1 the shapes are exactly
    the configured ones, which is how full-size configs state published architectures directly.
    """

    num_experts: int = 8
    top_k: int = 2
    expert_hidden: int = 1024
    granularity: int = 1
    num_shared_experts: int = 0
    # Scale the shared experts' output by sigmoid(w·x), one learned D-vector per layer (Qwen1.5/Qwen2-MoE).
    shared_expert_gate: bool = False
    # Llama 4: the gate weight scales the routed expert's input instead of its output (top-1 only, where the two
    # differ by the expert's nonlinearity).
    expert_input_scaling: bool = False
    # Scoring rule: softmax_topk (softmax over all experts, then top-k: DeepSeekMoE, V2),
    # topk_softmax (top-k logits, then softmax over them: Mixtral, DBRX), sigmoid (V3).
    scoring: Scoring = Scoring.softmax_topk
    # Routing scheme (train/model/moe/routers.py): topk (token choice with `scoring`), noisy_topk (Shazeer 2017),
    # switch (top-1, Fedus 2021), gshard (top-2 with random second expert, Lepikhin 2020), expert_choice (Zhou
    # 2022, training only), base (balanced assignment, Lewis 2021), hash (fixed hash of the token id, Roller 2021).
    router: RouterScheme = RouterScheme.topk
    norm_topk_prob: bool = False  # renormalise the k gate weights to sum to one
    routed_scaling_factor: float = 1.0
    # Group-limited routing: pick `topk_groups` of `num_groups` expert groups per token first
    # (V2's device-limited greedy, V3's node-limited routing). 1 group = unlimited.
    num_groups: int = 1
    topk_groups: int = 1
    group_score: GroupScore = GroupScore.max  # max (V2) or top2_sum (V3)
    # Top-M device-limited routing (DeepSeek-V2): a token uses experts of at most `device_limit` of the
    # `routing_groups` contiguous expert blocks; null = unlimited.
    device_limit: Optional[int] = None
    # The blocks the device limit counts. Part of the model, not of the layout: null is resolved once, at a run's
    # first start, to its parallel.ep_size, and the stored value is kept by every later resume, init_from,
    # generate and export whatever their ep_size (train/config/routing.py states the rule).
    routing_groups: Optional[int] = None
    # Token capacity per expert as a multiple of the even share; null = dropless.
    capacity_factor: Optional[float] = None
    # Capacity factor outside training (evaluation); null = `capacity_factor` (ST-MoE: 1.25 train, 2.0 eval).
    eval_capacity_factor: Optional[float] = None
    # Token capacity per expert-parallel device (DeepSeek-V2 token dropping): each device takes at most this
    # multiple of an even share of the (token, device) copies; the lowest-affinity copies beyond it are dropped.
    # Applied per sending rank under expert parallelism (see `train/model/moe/capacity.py`); null = dropless.
    device_capacity_factor: Optional[float] = None
    # Balance terms (each logged separately; their sum is `aux_loss`).
    expert_balance_coef: float = 0.0  # alpha_1, expert-level (Switch f.P)
    device_balance_coef: float = 0.0  # alpha_2, DeepSeek-V2 device-level
    comm_balance_coef: float = 0.0  # alpha_3, DeepSeek-V2 communication
    seq_balance_coef: float = 0.0  # alpha, DeepSeek-V3 sequence-wise
    z_loss_coef: float = 0.0  # ST-MoE router z-loss
    # noisy_topk (Shazeer et al. 2017): w_importance and w_load of the CV^2 importance and load losses.
    importance_coef: float = 0.0
    load_coef: float = 0.0
    # switch: multiplicative input jitter x * U(1 - eps, 1 + eps) on the router input in training; 0 = off.
    jitter_eps: float = 0.0
    # base: Sinkhorn iterations of the balanced assignment.
    sinkhorn_iters: int = 20
    # Auxiliary-loss-free balancing (V3): per-expert selection bias updated by +-rate after each step.
    bias_update_rate: float = 0.0  # gamma; 0 disables the bias
    # Layer placement: layer i is MoE when i >= first_k_dense and i % layer_freq == layer_offset. DeepSeek's
    # rule is offset 0 (the first layer of each group of layer_freq); Qwen2-MoE's decoder_sparse_step, Llama 4's
    # interleave_moe_layer_step and OpenMoE's MoE interval make the last one MoE: offset layer_freq - 1.
    first_k_dense: int = 0
    layer_freq: int = 1
    layer_offset: int = 0
    router_dtype: str = "float32"

    # ---- derived values (the only place they are computed) ----
    @property
    def num_routed_experts(self) -> int:
        m, n, s = self.granularity, self.num_experts, self.num_shared_experts
        return m * (n + s) - s

    @property
    def num_active_routed(self) -> int:
        m, k, s = self.granularity, self.top_k, self.num_shared_experts
        return m * (k + s) - s

    @property
    def routed_hidden(self) -> int:
        return self.expert_hidden // self.granularity

    @property
    def shared_hidden(self) -> int:
        """Width of all shared experts fused into one SwiGLU MLP (a sum of SwiGLUs is one wider SwiGLU)."""
        return self.num_shared_experts * self.routed_hidden

    @property
    def uses_expert_bias(self) -> bool:
        return self.bias_update_rate > 0.0


@dataclass
class ModelConfig:
    name: str = "tiny_mixtral"
    # mixtral | dbrx | deepseek_moe | deepseek_v2 | deepseek_v3 | qwen2_moe | qwen3_moe | olmoe | grok | openmoe |
    # llama4: selects conversion and defaults, not code paths
    family: str = "mixtral"
    vocab_size: int = 8192
    d_model: int = 256
    num_layers: int = 4
    max_seq_len: int = 4096
    norm: Norm = Norm.rmsnorm  # rmsnorm | layernorm (LayerNorm without bias, DBRX)
    norm_eps: float = 1e-5
    dense_hidden: int = 1024  # width of dense SwiGLU layers (DeepSeek's first_k_dense layers)
    tie_embeddings: bool = False
    init_std: float = 0.02
    # Grok-1: a second norm on each sublayer's output before the residual add (4 norms per block), and constant
    # multipliers on the input embeddings and the output logits. Off / 1.0 for every other family.
    post_sublayer_norm: bool = False
    # The gate's activation in every gated FFN (dense, routed and shared experts): silu (SwiGLU) or gelu_tanh
    # (GeGLU with tanh-approximated GELU, Grok-1's jax.nn.gelu).
    ffn_activation: FfnActivation = FfnActivation.silu
    embedding_multiplier: float = 1.0
    output_multiplier: float = 1.0
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    rope: RopeConfig = field(default_factory=RopeConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    # Multi-token prediction (V3): D sequential modules sharing embedding and head; loss weight lambda.
    mtp_depth: int = 0
    mtp_loss_weight: float = 0.3

    def is_moe_layer(self, layer_idx: int) -> bool:
        m = self.moe
        if not 0 <= m.layer_offset < m.layer_freq:
            raise ValueError(f"moe.layer_offset={m.layer_offset} must lie in [0, moe.layer_freq={m.layer_freq})")
        return layer_idx >= m.first_k_dense and layer_idx % m.layer_freq == m.layer_offset

    @property
    def head_dim(self) -> int:
        a = self.attention
        return a.head_dim if a.head_dim is not None else self.d_model // a.num_heads
