"""Step time of a training layout from FLOPs and bytes: a roofline with stated rates, no GPU.

Per pipeline stage rank s and micro-batch (t = micro_batch x seq_len tokens on the rank):
  compute_s = t · F_s / (peak · efficiency), F_s = the training FLOPs per token of the stage's blocks
    (`train.flops.block_flops_per_token`: 6 × active parameters + attention scores and context, no causal halving),
    plus, on the last stage, the final norm and output head and each MTP module's projection, block and head matmul;
    plus recomputation: `full` runs each block's forward again (+1/3 of its FLOPs), `selective` the attention core
    (2·H·T·(d_qk + d_v) per token per block). Routed experts: each rank computes its own tokens' K expert rows on
    average (balanced routing).
  all-to-all_s, per MoE block: each token's rows go to d ranks (`expected_devices_per_token`: deduplicated per rank,
    group-limited routing and `device_limit` included), (ep - 1)/ep of them to another rank; four exchanges
    (dispatch and combine, forward and backward; `full` checkpointing repeats the forward two): dispatch forward in
    the a2a dtype (fp8: 1 + 4/128 bytes per value with its block scales; else the residual stream's dtype),
    the other three in the matmul dtype.
  ZeRO-3: every micro-batch all-gathers the rank's parameters (fp32 masters) for the forward, again for the backward
    (and for `full`'s recompute), and reduce-scatters the fp32 gradients; ZeRO-2 reduce-scatters the gradients every
    micro-batch (DeepSpeed reduces as backward produces them).
  pipeline sends: the forward activation and its gradient, per chunk boundary (v per rank when interleaved), in the
    residual stream's dtype.
Per step: the data-parallel reduction of the stage's fp32 gradients once (stage 0: an all-reduce; ZeRO-1: a
reduce-scatter and the all-gather of the updated parameters; ZeRO-2: the all-gather only), dense over the stage's
world / pp ranks, experts over their world / pp / ep replicas, the slowest stage's.
Ring collectives: an all-gather or reduce-scatter over n ranks moves (n - 1)/n of the bytes per rank, an all-reduce
twice that. A group within one node (consecutive ranks, at most `gpus_per_node`) runs at the intra-node bandwidth,
one spanning nodes at the inter-node (per GPU) bandwidth; an all-to-all splits its bytes between the two by where
the destination ranks sit, both links moving at once.
Overlap: comm runs `comm_overlap` hidden behind compute (default 0: nothing overlaps, an upper bound).
step = m · max_s(compute_s + (1 - overlap)·comm_s) / (1 - bubble) + (1 - overlap)·DP reduction, the bubble from
`train.plan.pipeline`. Not modelled: the optimizer step (memory-bound), kernel launch gaps, routing imbalance, and
the pipeline's stage imbalance beyond taking the slowest stage. MFU counts the model's FLOPs
(`train.flops.flops_per_token`, recomputation excluded) over world × peak × step.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from train.config import TrainConfig
from train.flops import attention_core_flops_per_token, block_flops_per_token, flops_per_token
from train.plan.activations import Shapes, expected_devices_per_token
from train.plan.pipeline import stage_blocks, stages

FP32 = 4


@dataclass(frozen=True)
class Hardware:
    """The rates the step time is computed at. Defaults: an H100/H200 SXM node (989 TFLOP/s dense bf16, NVLink 4
    at 450 GB/s per direction per GPU, one 400 Gb/s NDR InfiniBand NIC per GPU = 50 GB/s, 8 GPUs a node), half of
    the peak reached by the kernels, no overlap."""

    peak_tflops: float = 989.0
    compute_efficiency: float = 0.5
    intra_node_gbps: float = 450.0
    inter_node_gbps: float = 50.0
    gpus_per_node: int = 8
    comm_overlap: float = 0.0


def _ring(nbytes: float, n: int, hw: Hardware, span: bool) -> float:
    """Seconds of an all-gather or reduce-scatter of `nbytes` (the whole) over n ranks."""
    if n <= 1:
        return 0.0
    return (n - 1) / n * nbytes / ((hw.inter_node_gbps if span else hw.intra_node_gbps) * 1e9)


def _a2a_seconds(rows_remote: float, row_bytes: float, ep: int, hw: Hardware) -> float:
    """Seconds to send `rows_remote` rows to the other ranks of an EP group of consecutive ranks."""
    g = hw.gpus_per_node
    inter = max(ep - g, 0) / (ep - 1) if ep > 1 else 0.0
    nbytes = rows_remote * row_bytes
    return max(nbytes * (1 - inter) / (hw.intra_node_gbps * 1e9), nbytes * inter / (hw.inter_node_gbps * 1e9))


def stage_flops_per_token(cfg: TrainConfig, blocks: list[int], last: bool) -> float:
    """Training FLOPs per token of a stage's blocks (and, `last`, its head and MTP modules), recomputation
    included (module docstring)."""
    m, T, mode = cfg.model, cfg.trainer.seq_len, cfg.trainer.activation_checkpointing
    f = sum(block_flops_per_token(m, i, T) for i in blocks)
    if mode == "full":
        f *= 4 / 3
    elif mode == "selective":
        f += len(blocks) * attention_core_flops_per_token(m, T)
    if last:
        D, V = m.d_model, m.vocab_size
        f += 6.0 * (D + V * D)  # final norm and output head
        f += m.mtp_depth * 6.0 * (3 * D + 2 * D * D + V * D)  # MTP's norms, eh_proj and its pass through the head
    return f


def estimate_step_time(cfg: TrainConfig, world_size: int, plan: dict, hw: Hardware = Hardware()) -> dict:
    """Step time, tokens/s per GPU and MFU of `cfg` on `world_size` ranks, from `plan_memory`'s plan (its stages'
    parameter counts and micro-batch count); see the module docstring. Times in seconds per step."""
    par, t, m = cfg.parallel, cfg.trainer, cfg.model
    P, v, ep, z = par.pp_size, par.pp_virtual_stages, par.ep_size, par.zero_stage
    mode, g = t.activation_checkpointing, hw.gpus_per_node
    pipe = plan["pipeline"]
    mb = pipe["micro_batches"]
    dp = world_size // P
    edp = dp // ep
    span = dp > g  # a stage's dp ranks are consecutive: its DP and EDP groups leave the node when they outgrow it
    sh = Shapes.of(cfg.precision.name, t.micro_batch_size, t.seq_len, ep)
    tokens = sh.tokens
    peak = hw.peak_tflops * 1e12
    fwd_row = m.d_model * ((1 + 4 / 128) if par.a2a_dtype == "fp8" else sh.stream)
    act_row = m.d_model * sh.act

    per_stage = []
    for st, info in zip(stages(cfg, mb), pipe["stages"]):
        blocks = stage_blocks(cfg, st)
        compute = tokens * stage_flops_per_token(cfg, blocks, st.last) / (peak * hw.compute_efficiency)
        a2a = 0.0
        moe_blocks = sum(m.is_moe_layer(i) for i in blocks)
        if ep > 1 and moe_blocks:
            remote = tokens * expected_devices_per_token(m, ep) * (ep - 1) / ep
            fwd_times = 2 if mode == "full" else 1
            a2a = moe_blocks * (fwd_times * (_a2a_seconds(remote, fwd_row, ep, hw)
                                             + _a2a_seconds(remote, act_row, ep, hw))
                                + 2 * _a2a_seconds(remote, act_row, ep, hw))
        dense, expert = info["params_per_rank"]["dense"], info["params_per_rank"]["expert"]
        zero_mb, dp_step = 0.0, 0.0
        gather = _ring(FP32 * dense, dp, hw, span) + _ring(FP32 * expert, edp, hw, span)
        if z == 3:
            zero_mb = (3 if mode == "full" else 2) * gather + gather  # gathers, then the gradients' reduce-scatter
        elif z == 2:
            zero_mb, dp_step = gather, gather
        else:  # stage 0's all-reduce, ZeRO-1's reduce-scatter + all-gather: the same bytes
            dp_step = 2 * gather
        p2p = 0.0
        if P > 1:
            apart = dp >= g  # adjacent stages are world / pp ranks apart
            p2p = 2 * v * tokens * m.d_model * sh.stream / ((hw.inter_node_gbps if apart else hw.intra_node_gbps)
                                                             * 1e9)
        per_stage.append({"compute": compute, "a2a": a2a, "zero": zero_mb, "pp_p2p": p2p, "dp_reduce": dp_step})

    hidden = 1 - hw.comm_overlap
    mb_time = [s["compute"] + hidden * (s["a2a"] + s["zero"] + s["pp_p2p"]) for s in per_stage]
    slow = max(range(P), key=lambda i: mb_time[i])
    bubble = plan["bubble_fraction"]
    pipeline = mb * mb_time[slow] / (1 - bubble)
    dp_reduce = hidden * max(s["dp_reduce"] for s in per_stage)
    step = pipeline + dp_reduce
    s = per_stage[slow]
    global_tokens = t.global_batch_size * t.seq_len
    model_flops = flops_per_token(m, t.seq_len) * global_tokens
    return {
        "step_time_s": step,
        "tokens_per_s_per_gpu": global_tokens / step / world_size,
        "mfu": model_flops / (step * world_size * peak),
        "bubble_fraction": bubble,
        "step_time_parts_s": {"compute": mb * s["compute"], "all_to_all": mb * hidden * s["a2a"],
                              "zero_gather_scatter": mb * hidden * s["zero"], "pp_p2p": mb * hidden * s["pp_p2p"],
                              "bubble": pipeline - mb * mb_time[slow], "dp_reduce": dp_reduce},
        "slowest_stage": slow,
        "hardware": asdict(hw),
    }


def balanced_layout(cfg: TrainConfig, chunks: int) -> list[int]:
    """Layers per chunk (consecutive, in order; entries may be 0) minimising the largest chunk's training FLOPs,
    the last chunk carrying the head and MTP modules (`stage_flops_per_token`): the planner's stage split by
    per-layer cost, for `parallel.pp_layout`. Exact, by dynamic programming over split points."""
    m, T = cfg.model, cfg.trainer.seq_len
    n = m.num_layers
    prefix = [0.0]
    for i in range(n):
        prefix.append(prefix[-1] + block_flops_per_token(m, i, T))
    tail = stage_flops_per_token(cfg, list(range(n, n + m.mtp_depth)), last=True)
    # best[k][j]: (largest chunk, sum of squares) over the first k chunks holding layers [0, j): the second key
    # breaks ties towards even chunks
    inf = (float("inf"), float("inf"))
    best = [[inf] * (n + 1) for _ in range(chunks + 1)]
    cut = [[0] * (n + 1) for _ in range(chunks + 1)]
    best[0][0] = (0.0, 0.0)
    for k in range(1, chunks + 1):
        extra = tail if k == chunks else 0.0
        for j in range(n + 1):
            for i in range(j + 1):
                c = prefix[j] - prefix[i] + extra
                cost = (max(best[k - 1][i][0], c), best[k - 1][i][1] + c * c)
                if cost < best[k][j]:
                    best[k][j], cut[k][j] = cost, i
    out, j = [], n
    for k in range(chunks, 0, -1):
        i = cut[k][j]
        out.append(j - i)
        j = i
    return out[::-1]
