"""`DeepSpeedEngine`: the `TrainEngine` for `parallel.zero_stage=1|2|3`, DeepSpeed ZeRO around moeforge's own
expert parallelism (the model is already parallelized: experts sharded, all-to-all dispatcher installed).

What ZeRO partitions, per rank (W ranks, EP degree ep, so each expert has W/ep replicas):
  stage 1: optimizer state (and fp32 master copies): dense 1/W, local experts 1/(W/ep) (over the EDP group);
  stage 2: also the reduced gradients, in the same proportions;
  stage 3: also the parameters themselves (gathered around each module's forward and backward).
Gradient semantics equal `parallel/grads.py`: every gradient is divided by W, dense ones reduced over the world,
expert ones over their EDP group; the clipping norm is the global one over all partitions.

Checkpoints go through DeepSpeed's per-parameter state API (`safe_get_full_fp32_param`,
`safe_get_full_optimizer_state`, `safe_set_full_optimizer_state`): `export_state` hands each parameter's whole
local weights and optimizer state to `train.checkpoint.sharded`, which stores them in logical coordinates, and
`import_state` writes them back into this engine's partitions whatever layout saved them. DeepSpeed's own
`save_checkpoint` files are per-rank partitions of flat buffers that its consolidation tools cannot read for
stacked experts (../shared/notes/deepspeed.md), so they would not reshard.
"""
from __future__ import annotations


import torch
from torch import nn

from parallel.engine import StepOutcome, TrainEngine
from parallel.memory import tensors_in, unique_bytes
from parallel.mesh import Mesh
from parallel.parallelize import expert_parameters
from parallel.zero.config import check_deepspeed_config, write_config
from parallel.zero.runtime import (adopt_mesh_groups, expert_marker, import_deepspeed, tag_expert_params)



def _named_groups(param_groups: list[dict]) -> list[dict]:
    """DeepSpeed's group splitter keys groups by name."""
    return [{**g, "name": g.get("name", f"group{i}")} for i, g in enumerate(param_groups)]


class DeepSpeedEngine(TrainEngine):
    """Wraps `deepspeed.initialize` over `model` and a torch optimizer built from `param_groups`.

    Before: `model` is parallelized and holds its final initial weights (identical dense weights on all ranks,
    each EP rank its experts). After construction: DeepSpeed owns the optimizer; at stage 3 every parameter of
    `model` is partitioned (use `full_parameters()` to read them whole)."""

    def __init__(self, model: nn.Module, param_groups: list[dict], optimizer_cls, cfg, mesh: Mesh,
                 accum_steps: int, run_dir=None):
        deepspeed = import_deepspeed()
        self.stage = cfg.parallel.zero_stage
        ds_config = check_deepspeed_config(cfg, accum_steps)
        if run_dir is not None and mesh.rank == 0:
            write_config(ds_config, run_dir)
        groups = _named_groups(param_groups)
        experts = expert_parameters(model) if mesh.ep_size > 1 else []
        if experts:  # with ep_size 1 every expert is replicated on all ranks: DeepSpeed treats it as dense
            adopt_mesh_groups(mesh)
            tag_expert_params(experts, mesh, self.stage)
            if self.stage < 3:  # ZeRO-3 refuses native MoE modules; its per-tensor placement needs no marker
                model.add_module("_deepspeed_expert_marker", expert_marker(mesh))
            from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

            groups = split_params_into_different_moe_groups_for_optimizer(groups)
        self.optimizer = optimizer_cls(groups)
        self.ds, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=ds_config,
                                                dist_init_required=False)
        self.model = model
        self.device = mesh.device
        if self.stage == 3:
            for p in model.parameters():
                # `.data` is gathered around each use and released after: nothing may cache a tensor derived from
                # it (read by `precision=bf16`'s compute copies, which are then cast per use)
                p.gathered_per_use = True
        self.forward = self.ds  # the engine's forward runs ZeRO's hooks and bookkeeping around the model's

    def backward(self, loss) -> None:
        boundary = self.ds.is_gradient_accumulation_boundary()
        self.ds.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself
        if not boundary:
            self.ds.step()  # between boundaries DeepSpeed's step only advances its micro-step counter

    def step(self) -> StepOutcome:
        if not self.ds.is_gradient_accumulation_boundary():
            raise RuntimeError("DeepSpeedEngine.step() before the last micro-batch of the step: the data gave "
                               "fewer micro-batches than gradient_accumulation_steps")
        skipped_before = self.ds.skipped_steps
        self.ds.step()  # in fp32 mode ZeRO skips the update itself when the global norm is not finite
        self._mark_updated()
        norm = self.ds.get_global_grad_norm()
        skipped = self.ds.skipped_steps > skipped_before
        # ZeRO reports a skipped step's norm as inf, and the culprits are spread over partitions: not named
        return StepOutcome(float("nan") if norm is None else float(norm), skipped=skipped)

    def _mark_updated(self) -> None:
        """Advance every parameter's version counter, as an in-place update through the parameter would.

        ZeRO-1/2 write the new weights into a flat buffer the parameters are views of (all-gathered from the fp32
        partitions), which leaves each parameter's own version counter and storage unchanged; anything keyed on
        them (autograd's saved-tensor check, `precision=bf16`'s cached bf16 copy) would not see the step."""
        for p in self.model.parameters():
            torch.autograd.graph.increment_version(p)

    def full_parameters(self):
        if self.stage < 3:
            return super().full_parameters()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None)

    def _flat_partitions(self) -> list:
        """The fp32 flat partitions the inner torch optimizer keys its state by (ZeRO-1/2 and ZeRO-3 name them
        differently; their param groups may hold other views)."""
        zero = self.ds.optimizer
        return list(zero.fp32_partitioned_groups_flat if self.stage == 3 else zero.single_partition_of_fp32_groups)

    def _zero_optimizer_state(self, kinds: dict[str, torch.Tensor]) -> None:
        """Give every flat fp32 partition the state `kinds` names (zeros; scalars as given) where it has none
        yet: a fresh engine has no optimizer state until its first step, and the setters write into it."""
        inner = self.ds.optimizer.optimizer
        for flat in self._flat_partitions():
            if not inner.state.get(flat):
                inner.state[flat] = {k: (torch.zeros_like(flat) if v.dim() else torch.zeros_like(v))
                                     for k, v in kinds.items()}

    def _link_state(self) -> None:
        """DeepSpeed 0.19.8 links each parameter's optimizer-state fragments only after the FIRST param group's
        step (`stage_1_and_2.py:2987`); the expert group comes last, so without this the per-parameter getters
        fail on the ranks holding a piece of it. Re-linking is cheap and idempotent."""
        if self.stage < 3:
            self.ds.optimizer._hp_optimizer_states_linked = False
            self.ds.optimizer._lazy_init_hp_params_optimizer_state()

    def _flat_state(self) -> dict:
        """One flat partition's optimizer state (all partitions step together: same step count)."""
        inner = self.ds.optimizer.optimizer
        return next((st for st in inner.state.values() if st), {})

    def export_state(self):
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        flat = self._flat_state()
        full_kinds = [k for k, v in flat.items() if torch.is_tensor(v) and v.dim() > 0]
        scalars = {k: v.detach().clone() for k, v in flat.items() if torch.is_tensor(v) and v.dim() == 0}
        if full_kinds:
            self._link_state()
        for name, p in self.model.named_parameters():  # each getter is a collective over p's partition group
            states = {"param": safe_get_full_fp32_param(p)}
            for kind in full_kinds:
                states[kind] = safe_get_full_optimizer_state(p, kind)
            yield name, {**states, **scalars}

    def import_state(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        if not states:
            return
        example = next(iter(states.values()))
        self._zero_optimizer_state(example)
        inner = self.ds.optimizer.optimizer
        for flat in self._flat_partitions():  # scalars (the step) are per flat partition
            for k, v in example.items():
                if v.dim() == 0:
                    inner.state[flat][k] = v.clone()
        self._link_state()
        params = dict(self.model.named_parameters())
        for name, kinds in states.items():
            for kind, value in kinds.items():
                if value.dim() > 0:
                    safe_set_full_optimizer_state(params[name], value.to(self.device), kind)

    def held_bytes(self) -> dict:
        # Where DeepSpeed 0.19.8 keeps each kind (tests/distributed/test_zero.py checks the totals):
        # ZeRO-1/2 partition gradients in `averaged_gradients` (at the accumulation boundary) and accumulate
        # ZeRO-2's in `all_grad_tensors` (whole parameters overlapping the partition); ZeRO-3 keeps the
        # parameter partitions in `ds_tensor` and the gradient partitions in `grad_partitions_flat_buffer`.
        zero = self.ds.optimizer
        params = list(self.model.parameters())
        param_tensors = [p.data for p in params] + [p.ds_tensor for p in params if hasattr(p, "ds_tensor")]
        grads = [p.grad for p in params if p.grad is not None]
        if self.stage < 3:
            grads += [*tensors_in(zero.averaged_gradients), *tensors_in(zero.all_grad_tensors)]
            masters = zero.single_partition_of_fp32_groups
        else:
            grads += list(tensors_in(zero.grad_partitions_flat_buffer))
            masters = zero.fp32_partitioned_groups_flat
        moments = tensors_in(list(zero.optimizer.state.values()))
        return {"params": unique_bytes(param_tensors), "grads": unique_bytes(grads),
                "optimizer": unique_bytes([*moments, *tensors_in(masters)])}
