"""Checkpoint files are loaded without running code: `torch.load(weights_only=True)` for the trainer's files and
DCP's tensors, and an allow-list of DCP's metadata classes for a sharded checkpoint's index."""
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


def test_a_planted_payload_in_a_sharded_checkpoint_index_is_refused_and_never_runs(tmp_path):
    """DCP's own reader unpickles `.metadata` with plain `pickle.load`; ours admits only its metadata classes."""
    import pickle

    from parallel.sharded_checkpoint import ShardedCheckpointError, index

    (tmp_path / "state").mkdir()
    marker = tmp_path / "pwned"
    (tmp_path / "state" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ShardedCheckpointError, match=r"\.metadata is unreadable or was altered \((posix|os)\.system is "
                                                     r"not part of a checkpoint index\)"):
        index(tmp_path)
    assert not marker.exists()
