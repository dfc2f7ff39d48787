"""Mixture-of-Experts feed-forward layer: router, grouped experts, dispatchers, capacity, balance terms."""
from train.model.moe.bias import update_expert_bias, update_expert_biases
from train.model.moe.capacity import (
    device_capacity,
    drop_over_capacity,
    drop_over_device_capacity,
    expert_capacity,
)
from train.model.moe.dispatch import LocalDispatcher, TokenDispatcher, combine_rows, gather_rows, sort_by_expert
from train.model.moe.experts import GroupedExperts, grouped_mm, grouped_mm_supported, looped_mm
from train.model.moe.layer import AUX_TERMS, MoELayer, MoELayerOutput
from train.model.moe.placement import ExpertPlacement
from train.model.moe.router import BalanceInputs, Router, RouterOutput, RoutingPlan
from train.model.moe.routers import ROUTERS, build_router

__all__ = [
    "AUX_TERMS",
    "BalanceInputs",
    "ExpertPlacement",
    "GroupedExperts",
    "LocalDispatcher",
    "MoELayer",
    "MoELayerOutput",
    "Router",
    "ROUTERS",
    "RouterOutput",
    "RoutingPlan",
    "TokenDispatcher",
    "build_router",
    "combine_rows",
    "device_capacity",
    "drop_over_capacity",
    "drop_over_device_capacity",
    "expert_capacity",
    "gather_rows",
    "grouped_mm",
    "grouped_mm_supported",
    "looped_mm",
    "sort_by_expert",
    "update_expert_bias",
    "update_expert_biases",
]
