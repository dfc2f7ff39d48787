"""`plan_memory(cfg, world_size)`: one rank's memory for a training layout, without any GPU.

Parameters, gradients and optimizer state come from the real model as the build pipeline (`train/build.py`) makes
it up to expert parallelism, on the meta device, as rank 0 of the layout (dense tensors replicated, E/ep experts
local), grouped by the trainer's own `param_groups` (`named_param_groups`: experts are told apart by name),
through `train.plan.state` (stage 0 and DeepSpeed ZeRO 1-3).
Activations come from `train.plan.activations` (per micro-batch, every checkpointing mode).

peak = params + grads + optimizer + activations (the configured checkpointing mode) + transient, where transient
is what lives only for a moment but alongside all of that, at the start of backward:
  max(loss head: the logits the output holds + the fp32 gradients of log-probabilities and logits, or one
      chunk's logits and their gradient with `model.loss_chunk_tokens` (`loss_head_transient`),
      what backward's recomputation saves again at one time (`full`: one block, all-to-alls included;
      `selective`: one checkpointed region) + one MoE layer's all-to-all send and receive buffers)
  + gradient-reduction bucket(s) (`parallel.bucket_mb`: one at stage 0, reduce + all-gather/prefetch for ZeRO)
  + ZeRO-3's largest gathered module (a block with its local experts, or the embedding / output head).
All-to-all buffers use the expected copy count under balanced routing (`expected_devices_per_token`); the worst
case, every one of a token's K experts on a different rank, is reported beside it. Not modelled: the CUDA context
and NCCL's own buffers, allocator fragmentation (leave headroom: `fits` keeps `headroom` of the device free), and
routing imbalance beyond the expectation (a rank receiving more rows than t·K).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass


from train.plan.state import DS_PERSISTENCE_THRESHOLD, state_bytes
from train.model.moe.experts import stacked_expert_tensors
from train.config import ModelConfig, TrainConfig
from train.plan.activations import Shapes, activation_bytes, expected_devices_per_token, loss_head_transient
from train.precision.bf16 import compute_copy_numel


@dataclass
class RankParams:
    """One rank's parameters: element counts per optimizer group, which are routed experts, and the largest
    module ZeRO-3 gathers whole."""

    groups: list[list[int]]
    expert_flags: list[list[bool]]
    dense_numel: int
    expert_numel: int
    largest_module_numel: int
    compute_copy_numel: int = 0  # precision=bf16: elements of the bf16 weight copies held beside the masters


_META_MODELS: dict = {}  # repr(ModelConfig) -> the model on the meta device (building a full size takes seconds)


def _meta_model(model_cfg: ModelConfig):
    from train.build import meta_model

    key = repr(model_cfg)
    if key not in _META_MODELS:
        _META_MODELS.clear()  # keep one: a fit search plans many layouts of one model in a row
        _META_MODELS[key] = meta_model(model_cfg)
    return _META_MODELS[key]


def rank_params(cfg: TrainConfig, world_size: int) -> RankParams:
    """This rank's model as the build pipeline makes it up to expert parallelism and checkpointing (stopping
    before materialisation: meta tensors, rank 0 of the layout), its parameters grouped as the trainer's
    optimizer groups them."""
    from train.build import build_model, planning_mesh
    from train.trainer.optim import named_param_groups

    mesh = planning_mesh(world_size, cfg.parallel.ep_size)
    model = build_model(cfg, mesh, stop_after="parallelize", model=copy.deepcopy(_meta_model(cfg.model))).model
    experts = stacked_expert_tensors(model)
    groups = named_param_groups(model, weight_decay=0.0)
    numels = [[p.numel() for p in g["params"]] for g in groups]
    flags = [[name in experts for name in g["names"]] for g in groups]
    expert_numel = sum(n for ns, fs in zip(numels, flags) for n, f in zip(ns, fs) if f)
    modules = [model.embed, model.lm_head, *model.layers, *model.mtp]
    largest = max(sum(p.numel() for p in m.parameters()) for m in modules)
    return RankParams(numels, flags, sum(map(sum, numels)) - expert_numel, expert_numel, largest,
                      compute_copy_numel(model))


def plan_memory(cfg: TrainConfig, world_size: int, device_memory: int | None = None, headroom: float = 0.1) -> dict:
    """Per-rank bytes of a layout (see the module docstring) under its `trainer.activation_checkpointing`; `fits`
    when `device_memory` is given: the peak within (1 − headroom) of it. `cfg` must be valid for `world_size`
    ranks (`train.plan.cli` validates)."""
    par, t, m = cfg.parallel, cfg.trainer, cfg.model
    mode = t.activation_checkpointing
    ep, stage = par.ep_size, par.zero_stage
    device_type = "cpu" if t.device == "cpu" else "cuda"
    rp = rank_params(cfg, world_size)
    threshold = ((par.deepspeed or {}).get("zero_optimization", {})
                 .get("stage3_param_persistence_threshold", DS_PERSISTENCE_THRESHOLD))
    held = state_bytes(rp.groups, rp.expert_flags, stage, world_size, ep, int(threshold))
    if stage < 3:  # precision=bf16: one bf16 copy of the converted masters, cached across the step; ZeRO-3 casts
        held["params"] += 2 * rp.compute_copy_numel  # per use instead (the copies autograd saves are activations)

    # bf16 is counted as it runs: bf16 residual stream, norm outputs and expert rows. fp8 builds on it and its GEMMs
    # save the same bf16 inputs (re-quantised in backward): planned as bf16.
    sh = Shapes.of(cfg.precision.name, t.micro_batch_size, t.seq_len, ep, device_type)
    acts = activation_bytes(m, sh)
    a2a, a2a_worst = 0, 0
    if ep > 1 and any(m.is_moe_layer(i) for i in range(m.num_layers)):
        # dispatch sends and receives copies of d_model in the residual stream's dtype (fp32 under autocast, bf16
        # under bf16), and combine returns them in the experts' (no wider): the rows bound both
        copies = sh.tokens * expected_devices_per_token(m, ep)
        a2a = int(2 * copies * m.d_model * sh.stream)
        a2a_worst = 2 * sh.tokens * min(m.moe.num_active_routed, ep) * m.d_model * sh.stream
    loss_head = loss_head_transient(m, sh)
    bucket = int(par.bucket_mb * 2**20)
    transient = {
        "loss_head": loss_head,
        "recompute": acts["recompute_by_mode"][mode],
        "a2a": a2a,
        "buckets": bucket if stage == 0 else 2 * bucket,
        "zero3_gathered": 4 * rp.largest_module_numel if stage == 3 else 0,
    }
    transient_total = (max(loss_head, transient["recompute"] + a2a) + transient["buckets"]
                       + transient["zero3_gathered"])
    activations = acts["by_mode"][mode]
    peak = held["params"] + held["grads"] + held["optimizer"] + activations + transient_total
    out = {
        "model": m.name,
        "layout": {"world_size": world_size, "ep_size": ep, "edp_size": world_size // ep, "zero_stage": stage,
                   "micro_batch_size": t.micro_batch_size, "seq_len": t.seq_len, "precision": cfg.precision.name,
                   "activation_checkpointing": mode, "device_type": device_type},
        "params_per_rank": {"dense": rp.dense_numel, "expert": rp.expert_numel},
        "params_bytes": held["params"],
        "grads_bytes": held["grads"],
        "grads_partition_bytes": held["grads_partition"],
        "optimizer_bytes": held["optimizer"],
        "activations_bytes": activations,
        "activations_bytes_by_mode": acts["by_mode"],
        "activations_parts": acts["parts"],
        "a2a_buffer_bytes": a2a,
        "a2a_buffer_worst_bytes": a2a_worst,
        "transient_bytes": transient_total,
        "transient_parts": transient,
        "peak_bytes": peak,
    }
    if device_memory is not None:
        usable = int(device_memory * (1 - headroom))
        out.update(device_memory_bytes=device_memory, usable_bytes=usable, fits=peak <= usable)
    return out
