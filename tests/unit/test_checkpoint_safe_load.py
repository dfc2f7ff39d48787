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


def test_a_planted_payload_in_the_dcp_index_is_refused_and_never_runs(tmp_path):
    """DCP's own reader unpickles `.metadata` with plain `pickle.load`; ours admits only its metadata classes."""
    import pickle

    from train.checkpoint.sharded import ShardedCheckpointError, index

    (tmp_path / "state").mkdir()
    marker = tmp_path / "pwned"
    (tmp_path / "state" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ShardedCheckpointError, match=r"\.metadata is unreadable or was altered \((posix|os)\.system is "
                                                     r"not part of a checkpoint index\)"):
        index(tmp_path)
    assert not marker.exists()


def test_a_checkpoint_in_the_old_expert_layout_is_refused_by_name(tmp_path, monkeypatch):
    """A sharded checkpoint whose experts are stored per projection (before the fused w_gate_up_EHD layout) gets an
    error that names the layout change and the way out, not a wrong expert count."""
    from train.checkpoint import sharded
    from train.config import load_train_config
    from train.model import build_model

    model = build_model(load_train_config(["model=tiny_mixtral"]).model)
    old = {}
    for name, t in model.state_dict().items():
        if ".experts." not in name:
            old[sharded.model_key(name)] = (tuple(t.shape), t.dtype)
            continue
        base = name.rsplit(".", 1)[0]
        for legacy in ("w_gate_EDF", "w_up_EDF", "w_down_EFD"):
            for e in range(t.shape[0]):
                old[sharded.model_key(f"{base}.{legacy}", e)] = ((1,), t.dtype)
    monkeypatch.setattr(sharded, "index", lambda ckpt_dir: old)
    with pytest.raises(sharded.ShardedCheckpointError, match=r"per-projection layout \(w_gate_EDF.*convert_hf"):
        sharded.load_model_weights(model, tmp_path, mesh=None)
