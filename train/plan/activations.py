"""Bytes that autograd saves for backward in one micro-batch's forward pass, by arithmetic from the config alone.

The counts follow this code's forward pass tensor by tensor (each storage once, as `train.plan.measure` measures
it with saved-tensor hooks): t = B·T tokens on the rank, D model dim, N = t·K expert rows (the expected count
under balanced routing; one rank can receive more), F expert / dense hidden width, V vocabulary.
What the forward keeps, per precision:
  - the residual stream, norm statistics and outputs, the router, gate weights, losses and log-softmax (t·V) are
    fp32 in every precision (norms compute in fp32 and their fp32 weight promotes the output);
  - matmul outputs are bf16 under `precision=bf16`, and every linear saves its own bf16 cast of an fp32 input
    (q, k and v each cast the same norm output) plus a bf16 copy of its weight (autocast's cache: one per weight);
  - routed experts see the fp32 norm output: on CPU (and in fp32) they run `torch._grouped_mm` in fp32; on CUDA
    under bf16 they take the per-expert matmul loop, which autocasts the rows and each local expert's weights.
Attention: fused SDPA (flash / memory-efficient: q, k, v, output and log-sum-exp) on CUDA, and on CPU when q and v
have one head size; CPU MLA (q/k 192 ≠ v 128 wide) takes the math path, which keeps the T×T probabilities (in fp32:
CPU upcasts reduced precision there).

Checkpointing modes (`trainer.activation_checkpointing`), per transformer block (MTP blocks included):
  none: everything; full: only the block input, one block recomputed at a time in backward;
  selective: the block input and the feed-forward sublayer's own tensors (router output, dispatched rows and
  all-to-all results, expert GEMM outputs, shared/dense FFN), recomputing norms and attention in backward.
Embedding, final norm, output head and loss (and MTP's projections around its block) are never recomputed.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import comb

from train.config import ModelConfig

MODES = ("none", "full", "selective")
_INPUT, _CKPT_INPUT, _ATTN, _FFN_IN, _FFN = "block_input", "checkpoint_input", "attention", "ffn_input", "ffn"
# per mode: the block categories kept until backward, and those recomputed one block at a time in backward
# (`checkpoint_input`: a block input that only a checkpoint keeps, e.g. an MTP block's bf16 input)
_KEPT = {"none": (_INPUT, _ATTN, _FFN_IN, _FFN), "full": (_INPUT, _CKPT_INPUT),
         "selective": (_INPUT, _CKPT_INPUT, _FFN)}
_RECOMPUTED = {"none": (), "full": (_ATTN, _FFN_IN, _FFN), "selective": (_ATTN, _FFN_IN)}


@dataclass(frozen=True)
class Shapes:
    """The micro-batch, precision and layout the activations depend on."""

    batch: int
    seq_len: int
    bf16: bool  # precision=bf16 (autocast); fp32 otherwise
    ep_size: int = 1
    device_type: str = "cuda"

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    @property
    def act(self) -> int:
        """Bytes per element of a matmul output."""
        return 2 if self.bf16 else 4

    @property
    def expert_act(self) -> int:
        """Bytes per element inside the routed experts (see the module docstring)."""
        return 2 if self.bf16 and self.device_type == "cuda" else 4


class _Saved:
    """Distinct saved storages of one block or of the parts outside blocks: key -> (bytes, category). A key
    kept twice (one tensor saved by two ops) counts once, under the category that kept it first."""

    def __init__(self, prefix: str):
        self.prefix, self.items = prefix, {}

    def keep(self, key: str, nbytes: int, cat: str) -> None:
        self.items.setdefault(f"{self.prefix}{key}", (int(nbytes), cat))

    def total(self, cats=None) -> int:
        return sum(b for b, c in self.items.values() if cats is None or c in cats)


def _linear(s: _Saved, sh: Shapes, name: str, inp: str, rows: int, k: int, out: int, in_bytes: int, cat: str,
            weight_cat: str | None = None, weight_key: str | None = None):
    """A bias-free linear's saves: its input (fp32 runs), or its own bf16 cast of an fp32 input and a bf16 copy of
    its weight (autocast; `weight_key` names a weight shared by several uses, cast once)."""
    if sh.bf16 and in_bytes == 4:
        s.keep(f"{name}.in_bf16", rows * k * 2, cat)
    else:
        s.keep(inp, rows * k * in_bytes, cat)
    if sh.bf16:
        s.keep(weight_key or f"{name}.weight_bf16", k * out * 2, weight_cat or cat)


def _norm(s: _Saved, kind: str, name: str, inp: str, rows: int, dim: int, in_bytes: int, cat: str,
          in_storage: int | None = None) -> str:
    """RMSNorm keeps its input in fp32 (the input itself or an fp32 copy), 1/rms and the normalised input in the
    input's dtype; LayerNorm keeps the fp32 input, mean and 1/std. The output is a new fp32 tensor (its key)."""
    if in_bytes == 4:
        s.keep(inp, in_storage if in_storage is not None else rows * dim * 4, cat)
    else:
        s.keep(f"{name}.x32", rows * dim * 4, cat)
    if kind == "layernorm":
        s.keep(f"{name}.stats", rows * 8, cat)
    else:
        s.keep(f"{name}.rstd", rows * 4, cat)
        s.keep(f"{name}.xn", rows * dim * in_bytes, cat)
    return f"{name}.out"


def _sdpa(s: _Saved, cfg: ModelConfig, sh: Shapes, q: str, k: str, v: str, heads: int, qk_dim: int, v_dim: int,
          v_storage: int):
    """Scaled-dot-product attention's saves (q and k already kept as new tensors by the caller's keys)."""
    t, a, B, T = sh.tokens, sh.act, sh.batch, sh.seq_len
    if sh.device_type == "cpu" and qk_dim != v_dim:  # CPU's flash kernel needs one head size for q, k and v
        # CPU math path, computed in fp32 whatever the input dtype: scaled q and k, probabilities, contiguous v
        s.keep("sdpa.q_scaled", t * heads * qk_dim * 4, _ATTN)
        s.keep("sdpa.k_scaled", t * heads * qk_dim * 4, _ATTN)
        s.keep("sdpa.probs", B * heads * T * T * 4, _ATTN)
        s.keep("sdpa.v", t * heads * v_dim * 4, _ATTN)
        return
    s.keep(q, t * heads * qk_dim * a, _ATTN)
    s.keep(k, t * heads * qk_dim * a, _ATTN)
    s.keep(v, v_storage, _ATTN)
    s.keep("sdpa.out", t * heads * v_dim * a, _ATTN)
    s.keep("sdpa.lse", B * heads * T * 4, _ATTN)
    if cfg.attention.sliding_window is not None:
        s.keep("sdpa.mask", T * T, _ATTN)


def _gqa(s: _Saved, cfg: ModelConfig, sh: Shapes, inp: str) -> None:
    at, t, a, D = cfg.attention, sh.tokens, sh.act, cfg.d_model
    H, Hkv, hd = at.num_heads, at.num_kv_heads, cfg.head_dim
    for name, width in (("q_proj", H * hd), ("k_proj", Hkv * hd), ("v_proj", Hkv * hd)):
        _linear(s, sh, name, inp, t, D, width, 4, _ATTN)
    if at.clip_qkv is not None:  # clamp keeps its input
        for name, width in (("q_proj", H * hd), ("k_proj", Hkv * hd), ("v_proj", Hkv * hd)):
            s.keep(f"{name}.out", t * width * a, _ATTN)
    s.keep("rope.cos_sin", sh.seq_len * hd * 4, _ATTN)
    if H != Hkv:  # repeat_kv materialises H heads of k and v
        _sdpa(s, cfg, sh, "q_rot", "k_rep", "v_rep", H, hd, hd, t * H * hd * a)
    else:
        _sdpa(s, cfg, sh, "q_rot", "k_rot", "v_proj.out", H, hd, hd, t * H * hd * a)
    s.keep("o_proj.in", t * H * hd * a, _ATTN)
    if sh.bf16:
        s.keep("o_proj.weight_bf16", H * hd * D * 2, _ATTN)


def _mla(s: _Saved, cfg: ModelConfig, sh: Shapes, inp: str) -> None:
    at, t, a, D = cfg.attention, sh.tokens, sh.act, cfg.d_model
    H, C, R = at.num_heads, at.kv_lora_rank, at.qk_rope_head_dim
    qk, vd = at.qk_nope_head_dim + R, at.v_head_dim
    if at.q_lora_rank is None:
        _linear(s, sh, "q_proj", inp, t, D, H * qk, 4, _ATTN)
    else:
        r = at.q_lora_rank
        _linear(s, sh, "q_a_proj", inp, t, D, r, 4, _ATTN)
        out = _norm(s, "rmsnorm", "q_a_norm", "q_a_proj.out", t, r, a, _ATTN)
        _linear(s, sh, "q_b_proj", out, t, r, H * qk, 4, _ATTN)
    _linear(s, sh, "kv_a_proj", inp, t, D, C + R, 4, _ATTN)
    # the latent is a view of kv_a_proj's output: fp32 runs keep that whole storage, bf16 an fp32 copy of the view
    out = _norm(s, "rmsnorm", "kv_a_norm", "kv_a_proj.out", t, C, a, _ATTN, in_storage=t * (C + R) * 4)
    _linear(s, sh, "kv_b_proj", out, t, C, H * (qk - R + vd), 4, _ATTN)
    s.keep("rope.cos_sin", sh.seq_len * R * 4, _ATTN)
    # q and k are new tensors (cat of nope and rotated rope parts); v is a view of kv_b_proj's output
    _sdpa(s, cfg, sh, "q", "k", "kv_b_proj.out", H, qk, vd, t * H * (qk - R + vd) * a)
    s.keep("o_proj.in", t * H * vd * a, _ATTN)
    if sh.bf16:
        s.keep("o_proj.weight_bf16", H * vd * D * 2, _ATTN)


def _swiglu(s: _Saved, sh: Shapes, name: str, inp: str, rows: int, D: int, F: int) -> None:
    """Dense SwiGLU (dense layers, fused shared experts): input saves, gate output (silu), silu and up outputs
    (product), the product (down projection)."""
    _linear(s, sh, f"{name}.w_gate", inp, rows, D, F, 4, _FFN_IN, _FFN)
    _linear(s, sh, f"{name}.w_up", inp, rows, D, F, 4, _FFN_IN, _FFN)
    s.keep(f"{name}.hidden", 4 * rows * F * sh.act, _FFN)
    if sh.bf16:
        s.keep(f"{name}.w_down.weight_bf16", F * D * 2, _FFN)


def expected_devices_per_token(cfg: ModelConfig, ep: int) -> float:
    """Distinct EP ranks a token's K experts live on, expected under uniform routing (the deduplicated dispatcher
    sends one copy per rank): ep·(1 − C(E−E/ep, K)/C(E, K)), over the groups a token may use when group-limited
    routing spans whole ranks, and at most `device_limit`."""
    moe = cfg.moe
    E, K = moe.num_routed_experts, moe.num_active_routed
    ranks, experts = ep, E
    if moe.num_groups > 1 and ep % moe.num_groups == 0:
        ranks, experts = ep * moe.topk_groups // moe.num_groups, E * moe.topk_groups // moe.num_groups
    local = E // ep
    d = ranks * (1 - comb(experts - local, K) / comb(experts, K))
    return min(d, moe.device_limit) if moe.device_limit is not None else d


def _moe(s: _Saved, cfg: ModelConfig, sh: Shapes, inp: str) -> None:
    moe, t, D = cfg.moe, sh.tokens, cfg.d_model
    E, K, F, ep = moe.num_routed_experts, moe.num_active_routed, moe.routed_hidden, sh.ep_size
    N, e = t * K, sh.expert_act
    s.keep(inp, t * D * 4, _FFN_IN)  # the fp32 router gate (autocast off) keeps the norm output itself
    s.keep("router.scores", t * E * 4, _FFN)
    s.keep("router.topk_ids", t * K * 8, _FFN)
    if moe.scoring == "topk_softmax" or moe.norm_topk_prob:
        s.keep("router.topk_weights", t * K * 4 + t * 4, _FFN)
    if moe.z_loss_coef:
        s.keep("router.logits", t * E * 4 + t * 4, _FFN)
    if moe.scoring == "sigmoid" and (moe.expert_balance_coef or moe.device_balance_coef or moe.comm_balance_coef
                                     or moe.seq_balance_coef):
        s.keep("balance.score_sums", t * 4, _FFN)
    if moe.seq_balance_coef:
        s.keep("balance.seq_f", sh.batch * E * 4, _FFN)
    if ep > 1:  # send plan index, gate-weight mask, and the returned copies summed into tokens (fp32)
        C = round(t * expected_devices_per_token(cfg, ep))
        s.keep("a2a.copy_token", C * 8, _FFN)
        s.keep("a2a.weight_mask", C * K * 4, _FFN)
        s.keep("a2a.returned", C * D * 4, _FFN)
    # rows by expert (fp32: the norm output gathered), row indices, gate weights per row
    s.keep("dispatch.indices", 3 * N * 8, _FFN)
    s.keep("dispatch.row_weights", N * 4, _FFN)
    E_loc = E // ep
    if e == 2:  # CUDA bf16: per-expert matmul loop under autocast
        s.keep("experts.in_bf16", 2 * N * D * 2, _FFN)
        s.keep("experts.weight_bf16", 3 * E_loc * D * F * 2, _FFN)
    else:
        s.keep("experts.in", N * D * 4, _FFN)
        if sh.device_type == "cpu":
            s.keep("experts.offsets", 3 * E_loc * 4, _FFN)
    s.keep("experts.hidden", 4 * N * F * e, _FFN)  # gate out, silu out, up out, product
    # combine: the expert output in fp32 (the output itself in fp32, a copy from bf16) and its weighted rows
    s.keep("combine.rows", 2 * N * D * 4, _FFN)
    if moe.num_shared_experts:
        _swiglu(s, sh, "shared", inp, t, D, moe.shared_hidden)


def block_saved(cfg: ModelConfig, sh: Shapes, layer_idx: int, in_bytes: int = 4) -> tuple[_Saved, int]:
    """What one transformer block saves, by category, and the byte width of its output (the residual stream:
    fp32, except an MTP block fed by the bf16 `eh_proj` until an fp32 sublayer output promotes it)."""
    s, t, D, a = _Saved(f"L{layer_idx}."), sh.tokens, cfg.d_model, sh.act
    s.keep("in", t * D * in_bytes, _INPUT if in_bytes == 4 else _CKPT_INPUT)
    out = _norm(s, cfg.norm, "attn_norm", "in", t, D, in_bytes, _ATTN)
    (_mla if cfg.attention.kind == "mla" else _gqa)(s, cfg, sh, out)
    mid_bytes = max(in_bytes, a)  # x + attn(x)
    out = _norm(s, cfg.norm, "ffn_norm", "mid", t, D, mid_bytes, _ATTN)
    if cfg.is_moe_layer(layer_idx):
        _moe(s, cfg, sh, out)
        return s, 4
    _swiglu(s, sh, "mlp", out, t, D, cfg.dense_hidden)
    return s, max(mid_bytes, a)


def _head(s: _Saved, cfg: ModelConfig, sh: Shapes, name: str, h: str, in_bytes: int) -> None:
    """Final norm, output head (one bf16 weight copy shared by every use), the fp32 log-softmax, the targets."""
    t, D, V = sh.tokens, cfg.d_model, cfg.vocab_size
    out = _norm(s, cfg.norm, f"{name}.norm", h, t, D, in_bytes, "head")
    _linear(s, sh, f"{name}.lm_head", out, t, D, V, 4, "head", weight_key="lm_head.weight_bf16")
    s.keep(f"{name}.log_probs", t * V * 4, "logits")
    s.keep(f"{name}.targets", t * 8, "head")


def activation_bytes(cfg: ModelConfig, sh: Shapes) -> dict:
    """Saved-for-backward bytes of one micro-batch on one rank, for every checkpointing mode.

    Returns {mode: bytes} under `by_mode`, the extra bytes live while backward recomputes one block
    (`recompute_by_mode`), and the `none` total by part (`parts`: blocks, then blocks/<category>, embedding, head,
    logits, mtp)."""
    t, D = sh.tokens, cfg.d_model
    outside = _Saved("")
    outside.keep("input_ids", t * 8, "embedding")
    blocks, in_bytes = [], 4
    for i in range(cfg.num_layers):
        s, in_bytes = block_saved(cfg, sh, i)
        blocks.append(s)
    _head(outside, cfg, sh, "main", f"L{cfg.num_layers}.in", in_bytes)
    h = f"L{cfg.num_layers}.in"
    for k in range(1, cfg.mtp_depth + 1):  # MTP: embed(t_{i+k}), enorm, hnorm, [emb; h] -> eh_proj -> block -> head
        m = f"mtp{k}"
        outside.keep(f"{m}.ids", t * 8, "mtp")  # shifted input ids
        _norm(outside, cfg.norm, f"{m}.enorm", f"{m}.emb", t, D, 4, "mtp")
        _norm(outside, cfg.norm, f"{m}.hnorm", h, t, D, 4, "mtp")
        _linear(outside, sh, f"{m}.eh_proj", f"{m}.cat", t, 2 * D, D, 4, "mtp")
        s, out_bytes = block_saved(cfg, sh, cfg.num_layers + k - 1, in_bytes=sh.act)
        blocks.append(s)
        h = f"{m}.h"
        _head(outside, cfg, sh, m, h, out_bytes)
    by_mode, recompute = {}, {}
    for mode in MODES:
        by_mode[mode] = outside.total() + sum(b.total(_KEPT[mode]) for b in blocks)
        recompute[mode] = max((b.total(_RECOMPUTED[mode]) for b in blocks), default=0)
    parts = {"blocks": sum(b.total(_KEPT["none"]) for b in blocks)}
    for cat in ("embedding", "head", "logits", "mtp"):
        parts[cat] = outside.total((cat,))
    for cat in _KEPT["none"]:
        parts[f"blocks/{cat}"] = sum(b.total((cat,)) for b in blocks)
    return {"by_mode": by_mode, "recompute_by_mode": recompute, "parts": parts}
