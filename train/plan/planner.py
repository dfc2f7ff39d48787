"""`plan_memory(cfg, world_size)`: one rank's memory for a training layout, without any GPU.

Parameters, gradients and optimizer state come from the real model as the build pipeline (`train/build.py`) makes
it up to expert parallelism, on the meta device, as rank 0 of the layout (dense tensors replicated, E/ep experts
local), grouped by the trainer's own `param_groups` (`named_param_groups`: experts are told apart by name),
through `train.plan.state` (stage 0 and DeepSpeed ZeRO 1-3).
Activations come from `train.plan.activations` (per micro-batch, every checkpointing mode).
Pipeline (`parallel.pp_size` > 1): each stage rank is planned alone (`train.plan.pipeline`: its layers, the
embedding on the first, head, MTP and the embedding's copy on the last), its state over the stage's world / pp_size
ranks (ZeRO-1 by the pipeline engine's own owner rule, `train.plan.state.pipeline_zero1_bytes`: the worst rank's),
its chunks' activations weighed by the micro-batches alive at its peak in torch's op order, and torch's receive
buffers (one per micro-batch, `pp_buffers_bytes`); the result is the worst stage's, every stage under
`pipeline.stages` (checked against 4 CPU ranks in tests/distributed/test_pipeline_memory.py).

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
import dataclasses
from dataclasses import dataclass


from train.plan.state import DS_PERSISTENCE_THRESHOLD, pipeline_zero1_bytes, state_bytes
from train.model.moe.experts import stacked_expert_tensors
from train.config import ModelConfig, TrainConfig
from train.config.pipeline import num_micro_batches, stage_layout
from train.plan.activations import Shapes, activation_bytes, expected_devices_per_token, loss_head_transient
from train.plan.pipeline import bubble_fraction, peak_in_flight, stage_blocks, stage_units, stages
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
    units: list[list[str]] | None = None  # each entry's top-level module (`unit_of`), for pipeline stages
    compute_copy_by_unit: dict | None = None
    # (unit, numel, is routed expert) of every trainable parameter in `named_parameters()` order: the order in
    # which the pipeline's ZeRO-1 assigns owners (`parallel.zero1.assign_owners`)
    named: list[tuple[str, int, bool]] | None = None

    def restrict(self, units: set[str]) -> "RankParams":
        """The parameters of the top-level modules `units` only (a pipeline stage's)."""
        keep = [[u in units for u in us] for us in self.units]
        groups = [[n for n, k in zip(ns, ks) if k] for ns, ks in zip(self.groups, keep)]
        flags = [[f for f, k in zip(fs, ks) if k] for fs, ks in zip(self.expert_flags, keep)]
        expert = sum(n for ns, fs in zip(groups, flags) for n, f in zip(ns, fs) if f)
        return RankParams(groups, flags, sum(map(sum, groups)) - expert, expert, self.largest_module_numel,
                          sum(self.compute_copy_by_unit.get(u, 0) for u in units), self.units,
                          self.compute_copy_by_unit, [e for e in self.named if e[0] in units])


_META_MODELS: dict = {}  # repr(ModelConfig) -> the model on the meta device (building a full size takes seconds)
_RANK_PARAMS: dict = {}  # (model, precision, ep) -> RankParams: a layout search plans many alike


def _meta_model(model_cfg: ModelConfig):
    from train.build import meta_model

    key = repr(model_cfg)
    if key not in _META_MODELS:
        _META_MODELS.clear()  # keep one: a fit search plans many layouts of one model in a row
        _RANK_PARAMS.clear()
        _META_MODELS[key] = meta_model(model_cfg)
    return _META_MODELS[key]


def unit_of(name: str) -> str:
    """The top-level module a parameter name belongs to: embed, layers.<i>, mtp.<k>, or head (final norm and
    output head), whatever wrappers sit below it."""
    parts = name.split(".")
    if parts[0] in ("layers", "mtp"):
        return f"{parts[0]}.{parts[1]}"
    return "embed" if parts[0] == "embed" else "head"


def rank_params(cfg: TrainConfig, world_size: int) -> RankParams:
    """This rank's model as the build pipeline makes it up to expert parallelism and checkpointing (stopping
    before materialisation: meta tensors, rank 0 of the layout), its parameters grouped as the trainer's
    optimizer groups them. The whole model: a pipeline stage's part is `RankParams.restrict`."""
    from train.build import build_model, planning_mesh
    from train.trainer.optim import named_param_groups

    meta = _meta_model(cfg.model)
    key = (repr(cfg.model), repr(cfg.precision), cfg.parallel.ep_size)  # checkpointing wraps, keeps every tensor
    if key in _RANK_PARAMS:
        return _RANK_PARAMS[key]
    mesh = planning_mesh(world_size, cfg.parallel.ep_size)
    # the whole model (a pipeline stage's share is taken by `restrict`), so not the build's pipeline split
    whole = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, pp_size=1, pp_schedule="1f1b",
                                                                  pp_virtual_stages=1, pp_layout=None))
    model = build_model(whole, mesh, stop_after="parallelize", model=copy.deepcopy(meta)).model
    experts = stacked_expert_tensors(model)
    groups = named_param_groups(model, weight_decay=0.0)
    numels = [[p.numel() for p in g["params"]] for g in groups]
    flags = [[name in experts for name in g["names"]] for g in groups]
    expert_numel = sum(n for ns, fs in zip(numels, flags) for n, f in zip(ns, fs) if f)
    modules = [model.embed, model.lm_head, *model.layers, *model.mtp]
    largest = max(sum(p.numel() for p in m.parameters()) for m in modules)
    by_unit = {"embed": compute_copy_numel(model.embed),
               "head": compute_copy_numel(model.norm) + compute_copy_numel(model.lm_head)}
    by_unit.update({f"layers.{i}": compute_copy_numel(b) for i, b in enumerate(model.layers)})
    by_unit.update({f"mtp.{k}": compute_copy_numel(b) for k, b in enumerate(model.mtp)})
    named = [(unit_of(n), p.numel(), n in experts) for n, p in model.named_parameters() if p.requires_grad]
    rp = RankParams(numels, flags, sum(map(sum, numels)) - expert_numel, expert_numel, largest,
                    compute_copy_numel(model), [[unit_of(n) for n in g["names"]] for g in groups], by_unit, named)
    _RANK_PARAMS[key] = rp
    return rp


def plan_memory(cfg: TrainConfig, world_size: int, device_memory: int | None = None, headroom: float = 0.1) -> dict:
    """Per-rank bytes of a layout (see the module docstring) under its `trainer.activation_checkpointing`; `fits`
    when `device_memory` is given: the peak within (1 − headroom) of it. `cfg` must be valid for `world_size`
    ranks (`train.plan.cli` validates). With `parallel.pp_size` > 1 every stage is planned (`pipeline.stages`
    in the result) and the figures reported are the worst stage's."""
    par, t, m = cfg.parallel, cfg.trainer, cfg.model
    P = par.pp_size
    device_type = "cpu" if t.device == "cpu" else "cuda"
    rp = rank_params(cfg, world_size // P)
    # bf16 is counted as it runs: bf16 residual stream, norm outputs and expert rows. fp8 builds on it and its GEMMs
    # save the same bf16 inputs (re-quantised in backward): planned as bf16.
    sh = Shapes.of(cfg.precision.name, t.micro_batch_size, t.seq_len, par.ep_size, device_type)
    acts = activation_bytes(m, sh)
    micro_batches = num_micro_batches(cfg, world_size)
    plans = [_stage_plan(cfg, world_size, rp if P == 1 else rp.restrict(stage_units(cfg, st)), st, sh, acts)
             for st in stages(cfg, micro_batches)]
    out = max(plans, key=lambda p: p["peak_bytes"])
    out["bubble_fraction"] = bubble_fraction(par.pp_schedule, P, par.pp_virtual_stages, micro_batches)
    out["pipeline"] = {
        "pp_size": P, "schedule": str(par.pp_schedule), "virtual_stages": par.pp_virtual_stages,
        "layout": stage_layout(cfg), "micro_batches": micro_batches, "worst_stage": out["stage"],
        "stages": [{k: p[k] for k in ("stage", "layers", "in_flight", "params_per_rank", "params_bytes", "grads_bytes",
                                      "optimizer_bytes", "pp_buffers_bytes", "activations_bytes",
                                      "peak_bytes")} for p in plans]}
    if device_memory is not None:
        usable = int(device_memory * (1 - headroom))
        out.update(device_memory_bytes=device_memory, usable_bytes=usable, fits=out["peak_bytes"] <= usable)
    return out


def _stage_activations(cfg: TrainConfig, st, sh: Shapes, acts: dict) -> dict:
    """A stage rank's activations at its peak, by checkpointing mode. One stage: one micro-batch of everything.
    A pipeline rank: each chunk's micro-batch costs its blocks (the MTP blocks with the model's last chunk), the
    embedding's saved ids on the first chunk, the head, loss and MTP modules on the last, and on every other chunk
    its output, which the schedule keeps until that micro-batch's backward (no node saves it); the peak is the most
    of the chunks' live micro-batches weighed by these over the rank's op sequence (`train.plan.pipeline`)."""
    m = cfg.model
    embedding = acts["parts"]["embedding"]
    if cfg.parallel.pp_size == 1:
        return {k: acts["outside"] + sum(b["kept"][k] for b in acts["per_block"]) for k in acts["by_mode"]}
    P, n = cfg.parallel.pp_size, cfg.parallel.pp_size * cfg.parallel.pp_virtual_stages
    out = {}
    for k in acts["by_mode"]:
        weights = []
        for j, layers in enumerate(st.chunk_layers):
            c = j * P + st.rank
            blocks = [*layers, *(range(m.num_layers, m.num_layers + m.mtp_depth) if c == n - 1 else ())]
            w = sum(acts["per_block"][b]["kept"][k] for b in blocks)
            w += embedding if c == 0 else 0
            w += acts["outside"] - embedding if c == n - 1 else sh.tokens * m.d_model * sh.stream
            weights.append(w)
        out[k] = int(peak_in_flight(st.ops, weights)[0])
    return out


def _stage_plan(cfg: TrainConfig, world_size: int, rp: RankParams, st, sh: Shapes, acts: dict) -> dict:
    """One stage rank's memory (the whole model's when pp_size = 1)."""
    par, t, m = cfg.parallel, cfg.trainer, cfg.model
    mode = t.activation_checkpointing
    ep, stage, P = par.ep_size, par.zero_stage, par.pp_size
    dp = world_size // P
    threshold = ((par.deepspeed or {}).get("zero_optimization", {})
                 .get("stage3_param_persistence_threshold", DS_PERSISTENCE_THRESHOLD))
    if P > 1 and stage == 1:  # the pipeline's own ZeRO-1 (`parallel.zero1`), not DeepSpeed's layout
        held = pipeline_zero1_bytes([(n, x) for _, n, x in rp.named], dp, ep)
    else:
        held = state_bytes(rp.groups, rp.expert_flags, stage, dp, ep, int(threshold))
    if stage < 3:  # precision=bf16: one bf16 copy of the converted masters, cached across the step; ZeRO-3 casts
        held["params"] += 2 * rp.compute_copy_numel  # per use instead (the copies autograd saves are activations)

    blocks = [acts["per_block"][b] for b in stage_blocks(cfg, st)]
    has_moe = any(m.is_moe_layer(i) for i in stage_blocks(cfg, st))
    a2a, a2a_worst = 0, 0
    if ep > 1 and has_moe:
        # dispatch sends and receives copies of d_model in the residual stream's dtype (fp32 under autocast, bf16
        # under bf16), and combine returns them in the experts' (no wider): the rows bound both
        copies = sh.tokens * expected_devices_per_token(m, ep)
        a2a = int(2 * copies * m.d_model * sh.stream)
        a2a_worst = 2 * sh.tokens * min(m.moe.num_active_routed, ep) * m.d_model * sh.stream
    loss_head = loss_head_transient(m, sh) if st.last else 0
    bucket = int(par.bucket_mb * 2**20)
    transient = {
        "loss_head": loss_head,
        "recompute": max((b["recompute"][mode] for b in blocks), default=0),
        "a2a": a2a,
        "buckets": bucket if stage == 0 else 2 * bucket,
        "zero3_gathered": 4 * rp.largest_module_numel if stage == 3 else 0,
    }
    transient_total = (max(loss_head, transient["recompute"] + a2a) + transient["buckets"]
                       + transient["zero3_gathered"])
    by_mode = _stage_activations(cfg, st, sh, acts)
    activations = by_mode[mode]
    # torch's receive buffers, one per micro-batch of the step, for every chunk's received activation (all but the
    # model's first chunk) and received gradient (all but the last), held from the first step on
    hidden = sh.tokens * m.d_model * sh.stream
    n = P * par.pp_virtual_stages
    chunk_ids = [j * P + st.rank for j in range(len(st.chunk_layers))]
    pp_buffers = (sum((c > 0) + (c < n - 1) for c in chunk_ids) * num_micro_batches(cfg, world_size) * hidden
                  if P > 1 else 0)
    peak = held["params"] + held["grads"] + held["optimizer"] + pp_buffers + activations + transient_total
    return {
        "model": m.name,
        "layout": {"world_size": world_size, "ep_size": ep, "edp_size": dp // ep, "zero_stage": stage,
                   "pp_size": P, "dp_size": dp,
                   "micro_batch_size": t.micro_batch_size, "seq_len": t.seq_len, "precision": cfg.precision.name,
                   "activation_checkpointing": mode, "device_type": sh.device_type},
        "stage": st.rank,
        "layers": len(st.layers),
        "in_flight": st.in_flight,
        "params_per_rank": {"dense": rp.dense_numel, "expert": rp.expert_numel},
        "params_bytes": held["params"],
        "grads_bytes": held["grads"],
        "grads_partition_bytes": held["grads_partition"],
        "optimizer_bytes": held["optimizer"],
        "activations_bytes": activations,
        "pp_buffers_bytes": pp_buffers,
        "activations_bytes_by_mode": by_mode,
        "activations_parts": acts["parts"],
        "a2a_buffer_bytes": a2a,
        "a2a_buffer_worst_bytes": a2a_worst,
        "transient_bytes": transient_total,
        "transient_parts": transient,
        "peak_bytes": peak,
    }
