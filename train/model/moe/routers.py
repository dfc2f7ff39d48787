"""The routing schemes by name: `model.moe.router` selects one; `build_router` constructs it.

Each scheme is a `Router` subclass (train/model/moe/router.py states the seam). Adding one is a class and a line
here; the layer, the capacity code and the dispatchers do not change.
"""
from __future__ import annotations

from train.config.model import MoEConfig
from train.model.moe.router import Router
from train.model.moe.schemes_assign import BaseRouter, ExpertChoiceRouter, HashRouter
from train.model.moe.schemes_token import GShardRouter, NoisyTopKRouter, SwitchRouter

ROUTERS: dict[str, type[Router]] = {
    "topk": Router,
    "noisy_topk": NoisyTopKRouter,
    "switch": SwitchRouter,
    "gshard": GShardRouter,
    "expert_choice": ExpertChoiceRouter,
    "base": BaseRouter,
    "hash": HashRouter,
}


def build_router(d_model: int, moe: MoEConfig) -> Router:
    """The router `moe.router` names, for `d_model`-wide tokens."""
    moe.validate()  # an unknown scheme included
    return ROUTERS[moe.router](d_model, moe)
