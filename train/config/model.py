"""Typed model configuration: one dataclass per concern, registered with Hydra.

Every field a published architecture needs is here; `configs/model/*.yaml` fill them in. Values that are
derived from others (expert width after fine-grained segmentation, the number of active routed experts, the
attention head size) are computed in exactly one place: the properties below. Each dataclass owns its rules in
`validate()` (a `ConfigError` naming the field, its value and the fix); the model constructors call the same
methods, so a config the trainer accepts always builds and one built by hand fails the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Optional

from train.config.errors import ConfigError, check, one_of
from train.config.choices import (
    AttentionKind, Family, FfnActivation, GroupScore, Norm, QkNorm, RopeScalingType, RouterScheme, Scoring,
)

KNOB = "knob"  # field metadata: a training knob (a run may change it), not the architecture


def knob(default):
    """A field that only shapes training (a loss coefficient, a capacity, the init): `trainer.init_from` lets the
    command line override it while the architecture comes from the checkpoint (train/trainer/init_from.py)."""
    return field(default=default, metadata={KNOB: True})


def training_knobs(node=None, prefix: str = "") -> tuple[str, ...]:
    """Dotted paths (relative to `model.`) of every field marked `knob`, read from the schema itself."""
    node = ModelConfig() if node is None else node
    found = []
    for f in fields(node):
        value = getattr(node, f.name)
        if f.metadata.get(KNOB):
            found.append(prefix + f.name)
        elif is_dataclass(value):
            found.extend(training_knobs(value, prefix + f.name + "."))
    return tuple(found)


MIN_CAPACITY_FACTOR = 0.5  # below it most token assignments are dropped
_ONE_EXPERT_ROUTERS = (RouterScheme.switch, RouterScheme.base, RouterScheme.hash)
_NO_TOKEN_CHOICE_TERMS = (RouterScheme.expert_choice, RouterScheme.base, RouterScheme.hash)


def check_group_limit(num_experts: int, top_k: int, groups: int, limit: Optional[int], groups_field: str,
                      limit_field: str) -> None:
    """Raise a ConfigError naming the fields and the fix unless `groups` contiguous blocks divide the
    `num_experts` routed experts and `limit` of them (None: no limit) can hold the `top_k` active ones."""
    if groups < 1 or num_experts % groups != 0:
        divisors = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
        raise ConfigError(f"{groups_field}={groups} must divide the {num_experts} routed experts: pick a divisor of "
                          f"{num_experts} ({', '.join(map(str, divisors))})")
    if limit is None:
        return
    if not 1 <= limit <= groups:
        raise ConfigError(f"{limit_field}={limit} must be between 1 and {groups_field}={groups}")
    per_group = num_experts // groups
    if limit * per_group < top_k:
        raise ConfigError(f"{limit_field}={limit} groups of {per_group} experts cannot hold top_k={top_k} experts: "
                          f"raise {limit_field} or lower model.moe.top_k")


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

    def validate(self) -> None:
        one_of("model.rope.scaling.type", self.type, RopeScalingType)
        check(self.factor > 0, f"model.rope.scaling.factor={self.factor} must be > 0")


@dataclass
class RopeConfig:
    theta: float = 10000.0
    # Whether the rotary pairs are adjacent channels (2i, 2i+1) as in DeepSeek's checkpoints, rather than
    # the two halves of the head (i, i + d/2) as in Llama-style checkpoints (Mixtral, DBRX).
    interleaved: bool = False
    scaling: Optional[RopeScalingConfig] = None

    def validate(self) -> None:
        check(self.theta > 0, f"model.rope.theta={self.theta} must be > 0")
        if self.scaling is not None:
            self.scaling.validate()


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

    def validate(self) -> None:
        """The attention's own rules (heads, the optional norms and windows); the constructors call it."""
        one_of("model.attention.kind", self.kind, AttentionKind)
        if self.qk_norm is not None:
            one_of("model.attention.qk_norm", self.qk_norm, QkNorm)
        check(self.num_heads >= 1, f"model.attention.num_heads={self.num_heads} must be >= 1")
        if self.kind == AttentionKind.gqa:
            check(self.num_kv_heads >= 1 and self.num_heads % self.num_kv_heads == 0,
                  f"model.attention.num_heads={self.num_heads} must be a multiple of model.attention.num_kv_heads="
                  f"{self.num_kv_heads}: set num_kv_heads to a divisor of num_heads")
        for name in ("head_dim", "sliding_window", "nope_layer_interval", "chunk_size", "q_lora_rank"):
            v = getattr(self, name)
            check(v is None or v >= 1, f"model.attention.{name}={v} must be >= 1 (or null)")
        for name in ("clip_qkv", "logit_softcap", "temperature_floor_scale"):
            v = getattr(self, name)
            check(v is None or v > 0, f"model.attention.{name}={v} must be > 0 (or null)")


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
    device_limit: Optional[int] = knob(None)
    # The blocks the device limit counts. Part of the model, not of the layout: null is resolved once, at a run's
    # first start, to its parallel.ep_size, and the stored value is kept by every later resume, init_from,
    # generate and export whatever their ep_size (train/config/routing.py states the rule).
    routing_groups: Optional[int] = None
    # Token capacity per expert as a multiple of the even share; null = dropless.
    capacity_factor: Optional[float] = knob(None)
    # Capacity factor outside training (evaluation); null = `capacity_factor` (ST-MoE: 1.25 train, 2.0 eval).
    eval_capacity_factor: Optional[float] = knob(None)
    # Token capacity per expert-parallel device (DeepSeek-V2 token dropping): each device takes at most this
    # multiple of an even share of the (token, device) copies; the lowest-affinity copies beyond it are dropped.
    # Applied per sending rank under expert parallelism (see `train/model/moe/capacity.py`); null = dropless.
    device_capacity_factor: Optional[float] = knob(None)
    # Balance terms (each logged separately; their sum is `aux_loss`).
    expert_balance_coef: float = knob(0.0)  # alpha_1, expert-level (Switch f.P)
    device_balance_coef: float = knob(0.0)  # alpha_2, DeepSeek-V2 device-level
    comm_balance_coef: float = knob(0.0)  # alpha_3, DeepSeek-V2 communication
    seq_balance_coef: float = knob(0.0)  # alpha, DeepSeek-V3 sequence-wise
    z_loss_coef: float = knob(0.0)  # ST-MoE router z-loss
    # noisy_topk (Shazeer et al. 2017): w_importance and w_load of the CV^2 importance and load losses.
    importance_coef: float = knob(0.0)
    load_coef: float = knob(0.0)
    # switch: multiplicative input jitter x * U(1 - eps, 1 + eps) on the router input in training; 0 = off.
    jitter_eps: float = knob(0.0)
    # base: Sinkhorn iterations of the balanced assignment.
    sinkhorn_iters: int = knob(20)
    # Auxiliary-loss-free balancing (V3): per-expert selection bias updated by +-rate after each step.
    bias_update_rate: float = knob(0.0)  # gamma; 0 disables the bias
    # Layer placement: layer i is MoE when i >= first_k_dense and i % layer_freq == layer_offset. DeepSeek's
    # rule is offset 0 (the first layer of each group of layer_freq); Qwen2-MoE's decoder_sparse_step, Llama 4's
    # interleave_moe_layer_step and OpenMoE's MoE interval make the last one MoE: offset layer_freq - 1.
    first_k_dense: int = 0
    layer_freq: int = 1
    layer_offset: int = 0

    def validate(self) -> None:
        """This MoE config's rules: shapes, groups, capacity, layer placement and what its routing scheme supports.
        `Router` and `MoELayer` call it, so every combination the trainer accepts builds."""
        one_of("model.moe.scoring", self.scoring, Scoring)
        one_of("model.moe.group_score", self.group_score, GroupScore)
        one_of("model.moe.router", self.router, RouterScheme)
        check(self.granularity >= 1, f"model.moe.granularity={self.granularity} must be >= 1")
        check(self.expert_hidden >= 1, f"model.moe.expert_hidden={self.expert_hidden} must be >= 1")
        check(self.expert_hidden % self.granularity == 0,
              f"model.moe.granularity={self.granularity} does not divide model.moe.expert_hidden={self.expert_hidden}"
              f": pick a granularity that divides it (expert width would be "
              f"{self.expert_hidden / self.granularity:g})")
        check(self.num_shared_experts >= 0, f"model.moe.num_shared_experts={self.num_shared_experts} must be >= 0")
        n, k = self.num_routed_experts, self.num_active_routed
        check(n >= 1, f"model.moe.num_experts={self.num_experts} gives {n} routed experts: need at least 1")
        check(1 <= k <= n,
              f"model.moe.top_k={self.top_k} gives {k} active routed experts (granularity={self.granularity}) but "
              f"there are {n} routed experts: set model.moe.top_k between 1 and {self.num_experts}")
        check_group_limit(n, k, self.num_groups, self.topk_groups, "model.moe.num_groups", "model.moe.topk_groups")
        check(self.num_groups == 1 or self.group_score != GroupScore.top2_sum or n // self.num_groups >= 2,
              f"model.moe.group_score=top2_sum needs at least 2 experts per group ({n} routed experts in "
              f"model.moe.num_groups={self.num_groups}): lower num_groups or use group_score=max")
        if self.routing_groups is not None:
            check_group_limit(n, k, self.routing_groups, self.device_limit, "model.moe.routing_groups",
                              "model.moe.device_limit")
        check(self.device_limit is None or self.device_limit >= 1,
              f"model.moe.device_limit={self.device_limit} must be >= 1 (or null: unlimited)")
        for name in ("capacity_factor", "device_capacity_factor", "eval_capacity_factor"):
            # capacity = factor x the average load, so a factor c < 1 drops at least 1 - c of the assignments: below
            # MIN_CAPACITY_FACTOR most of the batch would be dropped, which no recipe in the literature does
            c = getattr(self, name)
            check(c is None or c > 0, f"model.moe.{name}={c} must be > 0 or null (dropless)")
            check(c is None or c >= MIN_CAPACITY_FACTOR,
                  f"model.moe.{name}={c} would drop at least {1 - (c or 0):.0%} of the token assignments "
                  f"(capacity = {name} x the average load): use >= 1.0 (1.25 is GShard's), or null for dropless")
        check(self.first_k_dense >= 0, f"model.moe.first_k_dense={self.first_k_dense} must be >= 0")
        self.check_layer_placement()
        check(not self.expert_input_scaling or k == 1,
              f"model.moe.expert_input_scaling=true scales the one routed expert's input, but model.moe.top_k="
              f"{self.top_k} gives {k} active routed experts: set model.moe.top_k=1 (granularity 1) or "
              f"model.moe.expert_input_scaling=false")
        self._validate_router()

    def check_layer_placement(self) -> None:
        check(self.layer_freq >= 1, f"model.moe.layer_freq={self.layer_freq} must be >= 1")
        check(0 <= self.layer_offset < self.layer_freq,
              f"model.moe.layer_offset={self.layer_offset} must lie in [0, model.moe.layer_freq={self.layer_freq})")

    def _validate_router(self) -> None:
        """The combinations each routing scheme (train/model/moe/routers.py) supports."""
        r, k, n = self.router, self.num_active_routed, self.num_routed_experts
        if r in _ONE_EXPERT_ROUTERS:
            check(k == 1, f"model.moe.router={r} sends each token to one expert: set model.moe.top_k=1 (got {k} "
                          f"active routed experts)")
        if r == RouterScheme.gshard:
            check(k == 2, f"model.moe.router=gshard is top-2: set model.moe.top_k=2 (got {k} active routed experts)")
        if r in (RouterScheme.switch, RouterScheme.gshard):
            check(self.scoring == Scoring.softmax_topk,
                  f"model.moe.router={r} gates with softmax probabilities: set model.moe.scoring=softmax_topk")
        if r == RouterScheme.switch:
            check(not self.norm_topk_prob, "model.moe.router=switch gates with the chosen probability, not "
                                           "renormalised: set model.moe.norm_topk_prob=false")
        if r == RouterScheme.noisy_topk and self.load_coef:
            check(k < n, f"model.moe.load_coef needs model.moe.top_k below the number of experts ({k} of {n}): "
                         f"lower top_k or set load_coef=0")
        if r != RouterScheme.topk:
            check(not self.uses_expert_bias, f"model.moe.bias_update_rate (DeepSeek-V3's selection bias) works with "
                                             f"model.moe.router=topk only, not {r}: set it to 0")
            check(self.num_groups == 1 and self.device_limit is None,
                  f"group- and device-limited routing (model.moe.num_groups, model.moe.device_limit) is topk's: "
                  f"set model.moe.num_groups=1 and model.moe.device_limit=null for model.moe.router={r}")
        for name, owner in (("importance_coef", "noisy_topk"), ("load_coef", "noisy_topk"), ("jitter_eps", "switch")):
            check(not getattr(self, name) or r == owner,
                  f"model.moe.{name} belongs to model.moe.router={owner}, not {r}: set it to 0")
        if r in _NO_TOKEN_CHOICE_TERMS:
            for name in ("expert_balance_coef", "device_balance_coef", "comm_balance_coef", "seq_balance_coef",
                         "device_capacity_factor"):
                check(not getattr(self, name), f"model.moe.{name} is a token-choice setting; model.moe.router={r} "
                                               f"balances by construction: set it to 0 (null for the capacity)")
        if r in (RouterScheme.base, RouterScheme.hash):
            check(self.capacity_factor is None and self.eval_capacity_factor is None,
                  f"model.moe.router={r} drops no tokens: set model.moe.capacity_factor=null")
            check(r != RouterScheme.hash or not self.z_loss_coef,
                  "model.moe.router=hash has no router logits: set model.moe.z_loss_coef=0")
        if r == RouterScheme.base:
            check(self.sinkhorn_iters >= 1, f"model.moe.sinkhorn_iters={self.sinkhorn_iters} must be >= 1")

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
    name: str = knob("tiny_mixtral")
    family: Family = Family.mixtral  # selects HF conversion and defaults, not code paths
    vocab_size: int = 8192
    d_model: int = 256
    num_layers: int = 4
    max_seq_len: int = knob(4096)
    norm: Norm = Norm.rmsnorm  # rmsnorm | layernorm (LayerNorm without bias, DBRX)
    norm_eps: float = 1e-5
    dense_hidden: int = 1024  # width of dense SwiGLU layers (DeepSeek's first_k_dense layers)
    tie_embeddings: bool = False
    init_std: float = knob(0.02)
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
    mtp_loss_weight: float = knob(0.3)
    # The loss head (main and MTP) computes its logits and cross-entropy this many tokens at a time, forward and
    # again in backward (train/model/loss_head.py), so it never holds B·T·V logits; 0 or a chunk covering the
    # micro-batch's B·T tokens: the plain head, whole logits (the only path that returns them with labels).
    loss_chunk_tokens: int = knob(1024)

    def validate(self) -> None:
        """Every rule of the model config (its sub-configs' `validate()` included); `MoETransformer` calls it."""
        one_of("model.norm", self.norm, Norm)
        one_of("model.ffn_activation", self.ffn_activation, FfnActivation)
        for name in ("vocab_size", "d_model", "num_layers", "max_seq_len", "dense_hidden"):
            check(getattr(self, name) >= 1, f"model.{name}={getattr(self, name)} must be >= 1")
        check(self.norm_eps > 0, f"model.norm_eps={self.norm_eps} must be > 0")
        check(self.mtp_depth >= 0, f"model.mtp_depth={self.mtp_depth} must be >= 0")
        check(self.loss_chunk_tokens >= 0, f"model.loss_chunk_tokens={self.loss_chunk_tokens} must be >= 0 (0: the "
                                           f"whole logits at once)")
        self.attention.validate()
        check(self.head_dim >= 1, f"model.attention.num_heads={self.attention.num_heads} leaves a head size of "
                                  f"{self.head_dim} for model.d_model={self.d_model}: set model.attention.head_dim")
        self.rope.validate()
        self.moe.validate()
        check(self.moe.router != RouterScheme.hash or self.mtp_depth == 0,
              "model.moe.router=hash needs the token ids, which multi-token-prediction modules do not pass: set "
              "model.mtp_depth=0")

    def is_moe_layer(self, layer_idx: int) -> bool:
        m = self.moe
        m.check_layer_placement()
        return layer_idx >= m.first_k_dense and layer_idx % m.layer_freq == m.layer_offset

    def loss_chunk(self, num_tokens: int) -> Optional[int]:
        """The tokens per chunk of the loss head for a micro-batch of `num_tokens` (B·T) tokens, or None for the plain
        head (whole logits): chunking is off (0) or one chunk would hold every token."""
        return self.loss_chunk_tokens if 0 < self.loss_chunk_tokens < num_tokens else None

    @property
    def head_dim(self) -> int:
        a = self.attention
        return a.head_dim if a.head_dim is not None else self.d_model // a.num_heads
