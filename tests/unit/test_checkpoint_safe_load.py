"""Checkpoint files are loaded without running code: `torch.load(weights_only=True)` plus, for DeepSpeed's
optimizer files only, the three DeepSpeed classes they contain."""
from __future__ import annotations

import os

import pytest
import torch

from train.checkpoint import CheckpointError, load_torch_file


class _Payload:
    """What a tampered checkpoint would carry: unpickling it would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant_payload(path, marker) -> None:
    torch.save({"step": 3, "optimizer": _Payload(marker)}, path)


def test_a_planted_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    plant_payload(tmp_path / "train_state.pt", marker)
    with pytest.raises(CheckpointError, match=r"train_state.pt was refused: .*GLOBAL (posix|os)\.system"):
        load_torch_file(tmp_path / "train_state.pt")
    assert not marker.exists()


def test_deepspeed_allow_list_admits_only_its_three_classes(tmp_path):
    from parallel.zero.engine import DeepSpeedEngine, safe_globals
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    assert len(safe_globals()) == 3
    torch.save({"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients, "w": torch.ones(2)},
               tmp_path / "optim.pt")
    loaded = DeepSpeedEngine._safe_load(str(tmp_path / "optim.pt"))
    assert loaded["zero_stage"] == ZeroStageEnum.gradients and loaded["loss_scaler"].cur_scale == 1.0
    marker = tmp_path / "pwned"
    plant_payload(tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    with pytest.raises(CheckpointError, match="was refused"):
        DeepSpeedEngine._safe_load(str(tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    assert not marker.exists()


def test_a_truncated_file_is_reported_as_damaged(tmp_path):
    torch.save({"w": torch.ones(1000)}, tmp_path / "optimizer_rank0.pt")
    data = (tmp_path / "optimizer_rank0.pt").read_bytes()
    (tmp_path / "optimizer_rank0.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="optimizer_rank0.pt is unreadable .* damaged"):
        load_torch_file(tmp_path / "optimizer_rank0.pt")
