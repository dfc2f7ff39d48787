"""`DeepSpeedEngine`: the `TrainEngine` for `parallel.zero_stage=1|2|3`, DeepSpeed ZeRO around moeforge's own
expert parallelism (the model is already parallelized: experts sharded, all-to-all dispatcher installed).

What ZeRO partitions, per rank (W ranks, EP degree ep, so each expert has W/ep replicas):
  stage 1: optimizer state (and fp32 master copies): dense 1/W, local experts 1/(W/ep) (over the EDP group);
  stage 2: also the reduced gradients, in the same proportions;
  stage 3: also the parameters themselves (gathered around each module's forward and backward).
Gradient semantics equal `parallel/grads.py`: every gradient is divided by W, dense ones reduced over the world,
expert ones over their EDP group; the clipping norm is the global one over all partitions.

Checkpoints: the model's logical weights stay in moeforge's `model.safetensors`; this engine writes DeepSpeed's
optimizer partitions under `CKPT/deepspeed/` with DeepSpeed's own `save_checkpoint` and reads them back with
`load_checkpoint` through a `weights_only=True` loader (`safe_globals()`), leaving the module's weights alone.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from parallel.engine import StepOutcome, TrainEngine
from parallel.memory import tensors_in, unique_bytes
from parallel.mesh import Mesh
from parallel.parallelize import expert_parameters
from parallel.zero.config import check_deepspeed_config, write_config
from parallel.zero.runtime import (adopt_mesh_groups, expert_marker, import_deepspeed, tag_expert_params)
from train.checkpoint import load_torch_file

TAG = "deepspeed"  # CKPT/deepspeed/: DeepSpeed's files of one checkpoint
RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")  # what save_checkpoint copies beside them


def safe_globals() -> list:
    """The classes DeepSpeed 0.19.8 pickles into its optimizer files besides tensors and plain data: its loss
    scaler (a plain attribute holder; fp32 runs keep it at scale 1), the ZeRO stage enum and the fragment address
    (a named tuple of ints). Nothing else is unpickled."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _named_groups(param_groups: list[dict]) -> list[dict]:
    """DeepSpeed's group splitter keys groups by name."""
    return [{**g, "name": g.get("name", f"group{i}")} for i, g in enumerate(param_groups)]


def _keep_module_weights(src, dst) -> None:
    """`load_checkpoint`'s module loader, replaced: DeepSpeed's module file holds rank 0's expert shards under the
    logical names, and the weights have already come from model.safetensors (each rank its own shards)."""


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
        self.ds.checkpoint_engine.load = self._safe_load
        self.model = model
        self.forward = self.ds  # the engine's forward runs ZeRO's hooks and bookkeeping around the model's

    @staticmethod
    def _safe_load(path, map_location=None):
        return load_torch_file(path, safe_globals())

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
        norm = self.ds.get_global_grad_norm()
        skipped = self.ds.skipped_steps > skipped_before
        # ZeRO reports a skipped step's norm as inf, and the culprits are spread over partitions: not named
        return StepOutcome(float("nan") if norm is None else float(norm), skipped=skipped)

    def full_parameters(self):
        if self.stage < 3:
            return super().full_parameters()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None)

    def save(self, ckpt_dir: Path, rank: int) -> None:
        self.ds.save_checkpoint(str(ckpt_dir), tag=TAG, client_state={}, save_latest=False)
        if rank == 0:  # DeepSpeed's consolidation scripts fail on stacked experts; model.safetensors is the
            for script in RECOVERY_SCRIPTS:  # consolidated copy, so they would only mislead
                (Path(ckpt_dir) / script).unlink(missing_ok=True)

    def load(self, ckpt_dir: Path, rank: int) -> None:
        path, _ = self.ds.load_checkpoint(str(ckpt_dir), tag=TAG, load_module_strict=False,
                                          load_optimizer_states=True, load_lr_scheduler_states=False,
                                          custom_load_fn=_keep_module_weights)
        if path is None:
            raise FileNotFoundError(f"{ckpt_dir}/{TAG}: DeepSpeed found no checkpoint to load")
        if self.stage < 3:
            # ZeRO-1/2 keep separate fp32 partitions; refresh the model's tensors from the restored ones
            self.ds.optimizer.update_lp_params()

    def has_state(self, ckpt_dir: Path, rank: int) -> bool:
        # DeepSpeed's name for rank r's optimizer partition (r is its rank in the data-parallel world)
        return (Path(ckpt_dir) / TAG / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").is_file()

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
