"""Single-process placeholders of the parallel API (to be replaced by the expert-parallel implementation)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Mesh:
    rank: int = 0
    world_size: int = 1
    ep_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def dp_size(self) -> int:
        """Data-parallel degree for data loading: every rank reads its own slice of the global batch."""
        return self.world_size


def init_distributed(cfg) -> Mesh:
    dev = cfg.trainer.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    return Mesh(device=torch.device(dev))


def parallelize(model, cfg, mesh: Mesh):
    return model


def reduce_gradients(model, mesh: Mesh) -> None:
    return None


def clip_grad_norm_(model, max_norm: float, mesh: Mesh) -> torch.Tensor:
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def all_reduce_stats(tensor: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    return tensor
