"""Activation bytes of one micro-batch's forward pass, kept until backward, by arithmetic from the config alone.

The counts follow this code's forward pass tensor by tensor (each storage once, as `train.plan.measure` measures
it) in every mode of `trainer.activation_checkpointing`: t = B·T tokens on the rank, D model dim, N = t·K expert
rows (the expected count under balanced routing; one rank can receive more), F expert / dense hidden width,
V vocabulary.
What the forward keeps, per precision:
  - the residual stream, norm statistics and outputs, the router, gate weights, losses and log-softmax (t·V) are
    fp32 in fp32 and bf16_autocast (norms compute in fp32 and their fp32 weight promotes the output);
  - matmul outputs are bf16 under `precision=bf16_autocast`, and every linear saves its own bf16 cast of an fp32 input
    (q, k and v each cast the same norm output) plus a bf16 copy of its weight (autocast's cache: one per weight);
  - routed experts see the fp32 norm output: under bf16_autocast their grouped GEMMs cast the rows and the stacked
    weights as autocast casts a linear's (on every device); in fp32 they run `torch._grouped_mm` (CPU) or the
    per-expert loop (CUDA) in fp32;
  - `precision=bf16` (`Shapes.end_to_end`): the residual stream, norm outputs and dispatched expert rows are bf16
    too, so linears and expert GEMMs save their bf16 inputs themselves, and the bf16 weight copies are state held
    across the step (`train.plan.planner`), not activations; norms and the router gate keep their bf16 inputs, not
    the fp32 copies they compute on (`train/model/upcast.py`); router, gate weights, balance terms and the loss
    stay fp32. fp8 builds on bf16 and keeps its figures (its FP8 GEMMs save the same bf16 inputs);
  - in every precision the combine keeps the expert outputs in their own dtype, the gate weights and indices, and
    the sum of the returned all-to-all copies only its index (`combine_rows`, `sum_rows_into`).
Attention: fused SDPA (flash / memory-efficient: q, k, v, output and log-sum-exp) on CUDA, and on CPU when q and v
have one head size; CPU MLA (q/k 192 ≠ v 128 wide) takes the math path, which keeps the T×T probabilities (in fp32:
CPU upcasts reduced precision there).

Checkpointing modes, per transformer block (MTP blocks included), as `parallel/activation_checkpointing.py` does
them. Every storage of a block is tagged with its region and with who holds it: autograd (`saved`, what `none`
keeps) and/or selective checkpointing's cache (`cached`: a matmul output, or the input of a wrapped region):
  none: everything autograd saves;
  full: the block input only; backward recomputes one block at a time, so one block's saves are transient;
  selective: the block input, the MoE sublayer outside its experts as `none` keeps it (router, dispatched rows,
    all-to-all results, combine), and inside the wrapped regions (`Block.token_mixing`, the routed experts, the
    shared / dense SwiGLU) every matmul output (q/k/v/o and MLA's projections, expert and FFN gate/up/down, o_proj
    and w_down included though no backward op needs them) and each region's input. Norms, RoPE, the attention
    core, the residual add and silu(g)*u are recomputed: one region's such saves at a time are transient.
Embedding, final norm, output head and loss (and MTP's projections around its block) are never recomputed.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import comb

from train.config import ModelConfig
from train.model.moe.placement import ExpertPlacement

MODES = ("none", "full", "selective")
# Regions of a block. `input`: the block's input (held by a checkpoint; the attention norm saves it when fp32);
# `moe_routing`: the MoE sublayer outside its experts, which selective never wraps; the others are the regions
# that selective checkpoints one by one (`Block.token_mixing`: both norms and attention, `GroupedExperts`, `SwiGLU`).
_INPUT, _MIXING, _ROUTING, _EXPERTS, _FFN = "input", "token_mixing", "moe_routing", "experts", "ffn"
_WRAPPED = (_MIXING, _EXPERTS, _FFN)
REGIONS = (_INPUT, _MIXING, _ROUTING, _EXPERTS, _FFN)


@dataclass(frozen=True)
class Shapes:
    """The micro-batch, precision and layout the activations depend on."""

    batch: int
    seq_len: int
    bf16: bool  # matmuls in bf16: precision=bf16_autocast, bf16 or fp8 (planned as bf16); fp32 otherwise
    ep_size: int = 1
    device_type: str = "cuda"
    end_to_end: bool = False  # with bf16: precision=bf16 or fp8 (bf16 residual stream, norm outputs), not autocast

    @classmethod
    def of(cls, precision: str, batch: int, seq_len: int, ep_size: int = 1, device_type: str = "cuda") -> "Shapes":
        """The shapes of `precision=<precision>` (fp8 builds on bf16 and keeps its figures)."""
        return cls(batch, seq_len, precision in ("bf16", "bf16_autocast", "fp8"), ep_size, device_type,
                   end_to_end=precision in ("bf16", "fp8"))

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    @property
    def act(self) -> int:
        """Bytes per element of a matmul output."""
        return 2 if self.bf16 else 4

    @property
    def stream(self) -> int:
        """Bytes per element of the residual stream, the norm outputs and the dispatched expert rows."""
        return 2 if self.bf16 and self.end_to_end else 4

    @property
    def casts(self) -> bool:
        """Autocast: every linear saves its own bf16 cast of an fp32 input and a bf16 copy of its weight. Under
        precision=bf16 the weight copies are state (`train.plan.planner`), cached once per step, not activations."""
        return self.bf16 and not self.end_to_end

    @property
    def expert_act(self) -> int:
        """Bytes per element inside the routed experts (see the module docstring)."""
        return self.act


@dataclass
class _Storage:
    nbytes: int
    region: str
    saved: bool  # autograd saves it for backward
    cached: bool  # selective checkpointing keeps it (a matmul output or a wrapped region's input)


class _Saved:
    """Distinct storages of one block or of the parts outside blocks, by key. A key met twice (one tensor saved
    by two ops, or saved and cached) is one storage: it keeps its first region and gathers both holders."""

    def __init__(self, prefix: str):
        self.prefix, self.items = prefix, {}

    def keep(self, key: str, nbytes: int, region: str, saved: bool = True, cached: bool = False) -> None:
        item = self.items.setdefault(f"{self.prefix}{key}", _Storage(int(nbytes), region, False, False))
        item.saved, item.cached = item.saved or saved, item.cached or cached

    def saved(self, regions=None) -> int:
        """What autograd saves (`none`), in `regions` (all by default)."""
        return sum(i.nbytes for i in self.items.values() if i.saved and (regions is None or i.region in regions))

    def kept(self, mode: str) -> int:
        """What stays alive from the forward until backward under `mode`."""
        if mode == "none":
            return self.saved()
        if mode == "full":
            return sum(i.nbytes for i in self.items.values() if i.region == _INPUT)
        return sum(i.nbytes for i in self.items.values()
                   if i.region == _INPUT or (i.region == _ROUTING and i.saved) or (i.region in _WRAPPED and i.cached))

    def recomputed(self, mode: str) -> int:
        """What backward saves again while it recomputes under `mode`: the whole block for `full`, the largest
        wrapped region's uncached saves for `selective` (regions are recomputed one at a time)."""
        if mode == "full":
            return sum(i.nbytes for i in self.items.values() if i.saved and i.region != _INPUT)
        if mode == "selective":
            return max(sum(i.nbytes for i in self.items.values() if i.region == r and i.saved and not i.cached)
                       for r in _WRAPPED)
        return 0


def _linear(s: _Saved, sh: Shapes, name: str, inp: str, rows: int, k: int, out: int, in_bytes: int, region: str,
            weight_key: str | None = None) -> str:
    """A bias-free linear's saves: its input in the dtype it arrives in (fp32 runs; bf16 ones under precision=bf16,
    whose residual stream and norm outputs are bf16), or its own bf16 cast of an fp32 input, and under autocast a
    bf16 copy of its weight (`weight_key` names a weight shared by several uses, cast once). Its output is a
    matmul output, which selective keeps; returns the output's key."""
    if sh.bf16 and in_bytes == 4:
        s.keep(f"{name}.in_bf16", rows * k * 2, region)
    else:
        s.keep(inp, rows * k * in_bytes, region)
    if sh.casts:
        s.keep(weight_key or f"{name}.weight_bf16", k * out * 2, region)
    s.keep(f"{name}.out", rows * out * sh.act, region, saved=False, cached=True)
    return f"{name}.out"


def _norm(s: _Saved, kind: str, name: str, inp: str, rows: int, dim: int, in_bytes: int, region: str,
          in_storage: int | None = None) -> str:
    """An fp32 input: RMSNorm keeps it, 1/rms and the normalised input; LayerNorm keeps it, mean and 1/std. A bf16
    input is kept as it is with the statistics, and the rest recomputed in backward (`train/model/upcast.py`).
    `in_storage`: the bytes of the input's storage when it is a view. The output is a new tensor (its key), in the
    input's dtype (the callers pass on its width)."""
    s.keep(inp, in_storage if in_storage is not None else rows * dim * in_bytes, region)
    if kind == "layernorm":
        s.keep(f"{name}.stats", rows * 8, region)
    else:
        s.keep(f"{name}.rstd", rows * 4, region)
        if in_bytes == 4:
            s.keep(f"{name}.xn", rows * dim * 4, region)
    return f"{name}.out"


def _sdpa(s: _Saved, cfg: ModelConfig, sh: Shapes, q: str, k: str, v: str, heads: int, qk_dim: int, v_dim: int,
          v_storage: int) -> str:
    """Scaled-dot-product attention's saves (q and k already kept as new tensors by the caller's keys); returns the
    key of the heads' output, which o_proj reads."""
    t, a, B, T = sh.tokens, sh.act, sh.batch, sh.seq_len
    if cfg.attention.logit_softcap is not None:  # materialised: tanh's and softmax's fp32 outputs, the mask
        s.keep(v, v_storage, _MIXING)
        s.keep("softcap.tanh", B * heads * T * T * 4, _MIXING)
        s.keep("softcap.probs", B * heads * T * T * 4, _MIXING)
        if sh.bf16:
            s.keep("softcap.probs_bf16", B * heads * T * T * 2, _MIXING)
        s.keep("softcap.mask", T * T, _MIXING)
        return "o_proj.in"
    if sh.device_type == "cpu" and qk_dim != v_dim:  # CPU's flash kernel needs one head size for q, k and v
        # CPU math path, computed in fp32 whatever the input dtype: scaled q and k, probabilities, contiguous v
        s.keep("sdpa.q_scaled", t * heads * qk_dim * 4, _MIXING)
        s.keep("sdpa.k_scaled", t * heads * qk_dim * 4, _MIXING)
        s.keep("sdpa.probs", B * heads * T * T * 4, _MIXING)
        s.keep("sdpa.v", t * heads * v_dim * 4, _MIXING)
        return "o_proj.in"
    s.keep(q, t * heads * qk_dim * a, _MIXING)
    s.keep(k, t * heads * qk_dim * a, _MIXING)
    s.keep(v, v_storage, _MIXING)
    s.keep("sdpa.out", t * heads * v_dim * a, _MIXING)
    s.keep("sdpa.lse", B * heads * T * 4, _MIXING)
    if cfg.attention.sliding_window is not None:
        s.keep("sdpa.mask", T * T, _MIXING)
    return "o_proj.in"


def _gqa(s: _Saved, cfg: ModelConfig, sh: Shapes, inp: str) -> None:
    at, t, a, D = cfg.attention, sh.tokens, sh.act, cfg.d_model
    H, Hkv, hd = at.num_heads, at.num_kv_heads, cfg.head_dim
    for name, width in (("q_proj", H * hd), ("k_proj", Hkv * hd), ("v_proj", Hkv * hd)):
        out = _linear(s, sh, name, inp, t, D, width, sh.stream, _MIXING)
        if at.clip_qkv is not None:  # clamp keeps its input
            s.keep(out, t * width * a, _MIXING)
        if at.qk_norm is not None and name != "v_proj":  # per head (rows t*heads) or over the projection
            rows, dim = (t * width // hd, hd) if at.qk_norm == "head" else (t, width)
            _norm(s, "rmsnorm", f"{name}.qk_norm", out, rows, dim, a, _MIXING)
    s.keep("rope.cos_sin", sh.seq_len * hd * 4, _MIXING)
    if H != Hkv:  # repeat_kv materialises H heads of k and v
        o = _sdpa(s, cfg, sh, "q_rot", "k_rep", "v_rep", H, hd, hd, t * H * hd * a)
    else:
        o = _sdpa(s, cfg, sh, "q_rot", "k_rot", "v_proj.out", H, hd, hd, t * H * hd * a)
    _linear(s, sh, "o_proj", o, t, H * hd, D, a, _MIXING)


def _mla(s: _Saved, cfg: ModelConfig, sh: Shapes, inp: str) -> None:
    at, t, a, D = cfg.attention, sh.tokens, sh.act, cfg.d_model
    H, C, R = at.num_heads, at.kv_lora_rank, at.qk_rope_head_dim
    qk, vd = at.qk_nope_head_dim + R, at.v_head_dim
    if at.q_lora_rank is None:
        _linear(s, sh, "q_proj", inp, t, D, H * qk, sh.stream, _MIXING)
    else:
        r = at.q_lora_rank
        q_a = _linear(s, sh, "q_a_proj", inp, t, D, r, sh.stream, _MIXING)
        out = _norm(s, "rmsnorm", "q_a_norm", q_a, t, r, a, _MIXING)
        _linear(s, sh, "q_b_proj", out, t, r, H * qk, sh.stream, _MIXING)
    kv_a = _linear(s, sh, "kv_a_proj", inp, t, D, C + R, sh.stream, _MIXING)
    # the latent is a view of kv_a_proj's output: the norm keeps that whole storage
    out = _norm(s, "rmsnorm", "kv_a_norm", kv_a, t, C, a, _MIXING, in_storage=t * (C + R) * a)
    kv_b = _linear(s, sh, "kv_b_proj", out, t, C, H * (qk - R + vd), sh.stream, _MIXING)
    s.keep("rope.cos_sin", sh.seq_len * R * 4, _MIXING)
    # q and k are new tensors (cat of nope and rotated rope parts); v is a view of kv_b_proj's output
    o = _sdpa(s, cfg, sh, "q", "k", kv_b, H, qk, vd, t * H * (qk - R + vd) * a)
    _linear(s, sh, "o_proj", o, t, H * vd, D, a, _MIXING)


def _swiglu(s: _Saved, sh: Shapes, name: str, inp: str, rows: int, D: int, F: int) -> None:
    """Dense SwiGLU (dense layers, fused shared experts), one selective region: its input (a norm output), the gate
    output (silu's input), silu and up outputs (the product's inputs), the product (the down projection's input)."""
    a, x = sh.act, sh.stream
    s.keep(inp, rows * D * x, _FFN, saved=False, cached=True)  # the region's input
    gate = _linear(s, sh, f"{name}.w_gate", inp, rows, D, F, x, _FFN)
    up = _linear(s, sh, f"{name}.w_up", inp, rows, D, F, x, _FFN)
    s.keep(gate, rows * F * a, _FFN)
    s.keep(f"{name}.silu", rows * F * a, _FFN)
    s.keep(up, rows * F * a, _FFN)
    _linear(s, sh, f"{name}.w_down", f"{name}.product", rows, F, D, a, _FFN)


def expected_devices_per_token(cfg: ModelConfig, ep: int) -> float:
    """Distinct EP ranks a token's K experts live on, expected under uniform routing (the deduplicated dispatcher
    sends one copy per rank): ep·(1 − C(E−E/ep, K)/C(E, K)), over the groups a token may use when group-limited
    routing spans whole ranks, and at most `device_limit`."""
    moe = cfg.moe
    E, K = moe.num_routed_experts, moe.num_active_routed
    ranks, experts = ep, E
    if moe.num_groups > 1 and ep % moe.num_groups == 0:
        ranks, experts = ep * moe.topk_groups // moe.num_groups, E * moe.topk_groups // moe.num_groups
    local = ExpertPlacement(E, ep).num_local_experts
    d = ranks * (1 - comb(experts - local, K) / comb(experts, K))
    return min(d, moe.device_limit) if moe.device_limit is not None else d


def _experts(s: _Saved, sh: Shapes, E_loc: int, N: int, D: int, F: int) -> None:
    """The routed experts, one selective region: two GEMMs (gate+up fused, then down), whose outputs autograd saves.
    The dispatched rows are gathered from the norm output, in its dtype. Autocast: the GEMMs save their bf16 casts
    of the fp32 rows and of the stacked weights; precision=bf16: the bf16 rows themselves (the weight copies are
    state). The offsets are saved where `torch._grouped_mm` runs (bf16 anywhere, fp32 on CPU; fp32 on CUDA loops
    over views)."""
    e, x = sh.expert_act, sh.stream
    s.keep("experts.in", N * D * x, _EXPERTS, saved=e == x, cached=True)  # the dispatched rows
    if e != x:
        s.keep("experts.in_bf16", N * D * 2, _EXPERTS)
    if sh.casts:
        s.keep("experts.weight_bf16", 3 * E_loc * D * F * 2, _EXPERTS)
    if e == 2 or sh.device_type == "cpu":
        s.keep("experts.offsets", 2 * E_loc * 4, _EXPERTS)
    s.keep("experts.gate_up", 2 * N * F * e, _EXPERTS, cached=True)  # silu's and the product's inputs
    s.keep("experts.silu_product", 2 * N * F * e, _EXPERTS)
    s.keep("experts.out", N * D * e, _EXPERTS, saved=False, cached=True)  # the combine saves it


def _moe(s: _Saved, cfg: ModelConfig, sh: Shapes, inp: str, in_bytes: int) -> None:
    """`in_bytes`: the width of the norm output `inp` (bf16 in an MTP block under autocast, fed by `eh_proj`)."""
    moe, t, D = cfg.moe, sh.tokens, cfg.d_model
    E, K, F, ep = moe.num_routed_experts, moe.num_active_routed, moe.routed_hidden, sh.ep_size
    N = t * K
    # the fp32 router gate (autocast off) keeps the norm output as it is (`upcast_op` under precision=bf16)
    s.keep(inp, t * D * in_bytes, _ROUTING)
    s.keep("router.scores", t * E * 4, _ROUTING)
    s.keep("router.topk_ids", t * K * 8, _ROUTING)
    if moe.scoring == "topk_softmax" or moe.norm_topk_prob:
        s.keep("router.topk_weights", t * K * 4 + t * 4, _ROUTING)
    if moe.z_loss_coef:
        s.keep("router.logits", t * E * 4 + t * 4, _ROUTING)
    if moe.scoring == "sigmoid" and (moe.expert_balance_coef or moe.device_balance_coef or moe.comm_balance_coef
                                     or moe.seq_balance_coef):
        s.keep("balance.score_sums", t * 4, _ROUTING)
    if moe.seq_balance_coef:
        s.keep("balance.seq_f", sh.batch * E * 4, _ROUTING)
    if ep > 1:  # send plan index (the returned copies' sum into tokens keeps only it), gate-weight mask
        C = round(t * expected_devices_per_token(cfg, ep))
        s.keep("a2a.copy_token", C * 8, _ROUTING)
        s.keep("a2a.weight_mask", C * K * 4, _ROUTING)
    # row indices, gate weights per row (the rows themselves are the experts' input)
    s.keep("dispatch.indices", 3 * N * 8, _ROUTING)
    s.keep("dispatch.row_weights", N * 4, _ROUTING)
    _experts(s, sh, ExpertPlacement(E, ep).num_local_experts, N, D, F)
    # combine (`_WeightedSum`): the expert output in its own dtype (with the row weights and indices above)
    s.keep("experts.out", N * D * sh.expert_act, _ROUTING)
    if moe.num_shared_experts:
        _swiglu(s, sh, "shared", inp, t, D, moe.shared_hidden)
        if moe.shared_expert_gate:  # sigmoid(gate) * shared: both factors
            _linear(s, sh, "shared_gate", inp, t, D, 1, sh.stream, _ROUTING)
            s.keep("shared_gate.sigmoid", t * sh.stream, _ROUTING)
            s.keep("shared.out", t * D * sh.act, _ROUTING)


def block_saved(cfg: ModelConfig, sh: Shapes, layer_idx: int, in_bytes: int | None = None) -> tuple[_Saved, int]:
    """What one transformer block saves and caches, by region, and the byte width of its output (the residual
    stream: fp32 under fp32 and autocast, except an MTP block fed by the bf16 `eh_proj` until an fp32 sublayer
    output promotes it; bf16 under precision=bf16)."""
    s, t, D, a = _Saved(f"L{layer_idx}."), sh.tokens, cfg.d_model, sh.act
    in_bytes = sh.stream if in_bytes is None else in_bytes
    s.keep("in", t * D * in_bytes, _INPUT, saved=False)  # a checkpoint holds it; the fp32 attn_norm saves it too
    out = _norm(s, cfg.norm, "attn_norm", "in", t, D, in_bytes, _MIXING)
    (_mla if cfg.attention.kind == "mla" else _gqa)(s, cfg, sh, out)
    if cfg.post_sublayer_norm:  # Grok-1: the attention output normalised before the residual add (fp32 out)
        _norm(s, cfg.norm, "attn_post_norm", "o_proj.out", t, D, a, _MIXING)
        a_out = sh.stream
    else:
        a_out = a
    mid_bytes = max(in_bytes, a_out)  # x + attn(x)
    out = _norm(s, cfg.norm, "ffn_norm", "mid", t, D, mid_bytes, _MIXING)
    if cfg.is_moe_layer(layer_idx):
        _moe(s, cfg, sh, out, mid_bytes)
        if cfg.post_sublayer_norm:
            _norm(s, cfg.norm, "ffn_post_norm", "moe.out", t, D, sh.stream, _ROUTING)
        return s, sh.stream
    _swiglu(s, sh, "mlp", out, t, D, cfg.dense_hidden)
    if cfg.post_sublayer_norm:
        _norm(s, cfg.norm, "ffn_post_norm", "mlp.out", t, D, a, _FFN)
        return s, sh.stream
    return s, max(mid_bytes, a)


def _head(s: _Saved, cfg: ModelConfig, sh: Shapes, name: str, h: str, in_bytes: int) -> None:
    """Final norm, output head (one bf16 weight copy shared by every use), the fp32 log-softmax, the targets. With
    a loss chunk (`cfg.loss_chunk`) the chunked loss head keeps instead the fp32 norm output, one fp32
    log-sum-exp per token and the targets: nothing of size t·V."""
    t, D, V = sh.tokens, cfg.d_model, cfg.vocab_size
    out = _norm(s, cfg.norm, f"{name}.norm", h, t, D, in_bytes, "head")
    if cfg.loss_chunk(t) is None:
        _linear(s, sh, f"{name}.lm_head", out, t, D, V, 4, "head", weight_key="lm_head.weight_bf16")
        s.keep(f"{name}.log_probs", t * V * 4, "logits")
    else:
        s.keep(out, t * D * 4, "head")
        s.keep(f"{name}.lse", t * 4, "head")
    s.keep(f"{name}.targets", t * 8, "head")


def loss_head_transient(cfg: ModelConfig, sh: Shapes) -> int:
    """What the loss head's backward holds at its start beyond the saved activations: the logits the output holds
    and the fp32 gradients of log-probabilities and logits (t·V each); with a loss chunk of c tokens, one chunk's
    recomputed fp32 logits, turned into their gradient in place, and its cast to bf16 under autocast (measured on
    CPU in tests/unit/test_loss_head.py). The weight's gradient is counted with the gradients."""
    t, V = sh.tokens, cfg.vocab_size
    chunk = cfg.loss_chunk(t)
    if chunk is None:
        return t * V * (sh.act + 2 * 4)
    return chunk * V * (4 + (sh.act if sh.bf16 else 0))


def activation_bytes(cfg: ModelConfig, sh: Shapes) -> dict:
    """Activation bytes of one micro-batch on one rank, for every checkpointing mode.

    Returns {mode: bytes kept from the forward until backward} under `by_mode`; the most that backward's
    recomputation saves again at one time (`recompute_by_mode`: one block for `full`, one wrapped region for
    `selective`); the `none` total by part (`parts`: blocks, blocks/<region>, embedding, head, logits, mtp); and
    each block's kept and recomputed bytes by mode (`per_block`) beside what lives outside blocks (`outside`)."""
    t, D = sh.tokens, cfg.d_model
    outside = _Saved("")
    outside.keep("input_ids", t * 8, "embedding")
    blocks, in_bytes = [], sh.stream
    for i in range(cfg.num_layers):
        s, in_bytes = block_saved(cfg, sh, i)
        blocks.append(s)
    _head(outside, cfg, sh, "main", f"L{cfg.num_layers}.in", in_bytes)
    h = f"L{cfg.num_layers}.in"
    for k in range(1, cfg.mtp_depth + 1):  # MTP: embed(t_{i+k}), enorm, hnorm, [emb; h] -> eh_proj -> block -> head
        m = f"mtp{k}"
        outside.keep(f"{m}.ids", t * 8, "mtp")  # shifted input ids
        _norm(outside, cfg.norm, f"{m}.enorm", f"{m}.emb", t, D, sh.stream, "mtp")
        _norm(outside, cfg.norm, f"{m}.hnorm", h, t, D, sh.stream, "mtp")
        _linear(outside, sh, f"{m}.eh_proj", f"{m}.cat", t, 2 * D, D, sh.stream, "mtp")
        s, out_bytes = block_saved(cfg, sh, cfg.num_layers + k - 1, in_bytes=sh.act)
        blocks.append(s)
        h = f"{m}.h"
        _head(outside, cfg, sh, m, h, out_bytes)
    by_mode = {mode: outside.saved() + sum(b.kept(mode) for b in blocks) for mode in MODES}
    recompute = {mode: max((b.recomputed(mode) for b in blocks), default=0) for mode in MODES}
    parts = {"blocks": sum(b.saved() for b in blocks)}
    for region in ("embedding", "head", "logits", "mtp"):
        parts[region] = outside.saved((region,))
    for region in REGIONS:
        parts[f"blocks/{region}"] = sum(b.saved((region,)) for b in blocks)
    # per block (main layers, then MTP blocks) and outside them, for the pipeline's stages (`train.plan.pipeline`)
    per_block = [{"kept": {mode: b.kept(mode) for mode in MODES},
                  "recompute": {mode: b.recomputed(mode) for mode in MODES}} for b in blocks]
    return {"by_mode": by_mode, "recompute_by_mode": recompute, "parts": parts, "per_block": per_block,
            "outside": outside.saved()}
