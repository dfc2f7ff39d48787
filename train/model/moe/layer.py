"""The MoE feed-forward layer: route, dispatch, run experts, combine, add shared experts; balance terms.

Shape legend: B batch, T tokens (a row's positions in (B, T); all B·T once flattened), D model dim, E routed experts,
K active routed experts, N routed rows, G devices.

Routing and expert computation are separate steps with `self.dispatcher` as the seam: `parallel/` replaces
the dispatcher, sets `self.experts.placement` (`GroupedExperts.shard`: the stacks keep the local experts), and
sets `num_devices` (= the placement's ep_size) and `count_reducer`.

Which experts a token may use never depends on `num_devices`: the device limit counts the model's
`moe.routing_groups` (train/config/routing.py). `num_devices` is the layout, and what measures the layout reads
it: the device and communication balance terms, the per-device statistics and the device capacity.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from train.config.model import MoEConfig
from train.model.mlp import SwiGLU
from train.model.moe import losses
from train.model.moe.capacity import (
    device_capacity,
    drop_over_capacity,
    drop_over_device_capacity,
    expert_capacity,
)
from train.model.moe.dispatch import LocalDispatcher, TokenDispatcher
from train.model.moe.experts import GroupedExperts
from train.model.moe.placement import ExpertPlacement
from train.model.moe.router import TOKEN_CHOICE_TERMS, BalanceInputs, RouterOutput
from train.model.moe.routers import build_router

AUX_TERMS = TOKEN_CHOICE_TERMS  # the default router's terms; other schemes declare more (`Router.balance_terms`)


@dataclass
class MoELayerOutput:
    """Coefficient-weighted balance terms (every term the router declares, 0.0 when a coefficient is 0) and
    detached stats of this forward: counts and fractions only (`tokens_per_expert_E`, `tokens_per_device_G`,
    `tokens_received_per_device_G`, `dropped_frac`, `devices_per_token_max|mean`, `a2a_tokens_sent`). Ratios
    over counts (load min/max/cv, device and communication imbalance) are the trainer's, computed once from a
    whole step's counts (`train/trainer/metrics.py`)."""

    aux_terms: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


class _Counts(NamedTuple):
    """`MoELayer._count`'s result: `reduced()` gives the packed counts summed by the `count_reducer`."""

    reduced: Callable[[], torch.Tensor]
    device_mask_TG: torch.Tensor
    has_extras: bool


class MoELayer(nn.Module):
    """Routed experts (E = `moe.num_routed_experts` of width `moe.routed_hidden`, K = `moe.num_active_routed`
    per token) plus optional always-active shared experts fused into one SwiGLU of width `moe.shared_hidden`.

    `count_reducer(t) -> t` is applied to the packed, non-differentiable count statistics (identity here;
    `parallel/` installs an all-reduce sum over data-parallel ranks so f terms and stats cover the whole batch).
    A reducer may also offer `start(t) -> (() -> t)`: the layer then launches the reduction before the dispatch
    and collects it after the combine, so that it adds no synchronisation of its own (`parallel/parallelize.py`).
    `count_load`: whether a training forward adds its selections to `expert_load_E` (the bias update's input);
    activation checkpointing turns it off while it recomputes a forward whose selections were already counted.
    """

    def __init__(self, d_model: int, moe: MoEConfig, init_std: float = 0.02, act: str = "silu") -> None:
        super().__init__()
        self.moe = moe
        self.num_experts, self.top_k = moe.num_routed_experts, moe.num_active_routed
        self.init_std = init_std
        self.router = build_router(d_model, moe)
        self.experts = GroupedExperts(self.num_experts, d_model, moe.routed_hidden, act)
        self.shared = SwiGLU(d_model, moe.shared_hidden, act) if moe.num_shared_experts > 0 else None
        # Qwen2-MoE's shared_expert_gate: sigmoid(w·x) scales the shared output per token.
        gated = self.shared is not None and moe.shared_expert_gate
        self.shared_gate = nn.Linear(d_model, 1, bias=False) if gated else None
        self.dispatcher: TokenDispatcher = LocalDispatcher(self.num_experts)
        self.count_reducer: Callable[[torch.Tensor], torch.Tensor] = _identity
        self.count_load = True
        if moe.uses_expert_bias:
            # Selections since the last bias update; not checkpointed (the update happens every step).
            self.register_buffer("expert_load_E", torch.zeros(self.num_experts, dtype=torch.long), persistent=False)
        else:
            self.expert_load_E = None
        self.reset_parameters()

    @property
    def num_devices(self) -> int:
        """Expert-parallel devices (ep_size); experts live on them as `ExpertPlacement(E, num_devices)` places
        them (the losses and capacity functions build it). The routing reads it only while `moe.routing_groups` is
        unresolved (see the router)."""
        return self.router.num_devices

    @num_devices.setter
    def num_devices(self, value: int) -> None:
        if self.num_experts % value != 0:
            raise ValueError(f"num_devices={value} must divide the number of routed experts {self.num_experts}")
        self.router.num_devices = value

    def reset_parameters(self, init_std: float | None = None) -> None:
        """normal(0, init_std) for the gate, the routed and the shared experts (and the shared gate)."""
        std = self.init_std if init_std is None else init_std
        self.router.reset_parameters(std)
        self.experts.reset_parameters(std)
        if self.shared is not None:
            self.shared.reset_parameters(std)
        if self.shared_gate is not None:
            nn.init.normal_(self.shared_gate.weight, mean=0.0, std=std)

    def forward(
        self, x_BTD: torch.Tensor, token_ids_BT: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, MoELayerOutput]:
        """`token_ids_BT`: the input token ids, read only by routers that route on them (hash)."""
        B, T_row, D = x_BTD.shape
        x_TD = x_BTD.reshape(-1, D)
        if self.router.needs_token_ids and token_ids_BT is not None:
            route = self.router(x_TD, token_ids_BT.reshape(-1))
        else:
            route = self.router(x_TD)
        topk_ids_TK = route.topk_ids_TK
        if self.moe.device_capacity_factor is not None:
            # Device budget first, from the router's own copies; per-expert capacity then caps what survives.
            G = self.num_devices
            budget = device_capacity(topk_ids_TK, self.num_experts, G, self.moe.device_capacity_factor)
            topk_ids_TK = drop_over_device_capacity(topk_ids_TK, route.topk_weights_TK, self.num_experts, G, budget)
        capacity_factor = self.router.capacity_factor()
        if capacity_factor is not None:
            capacity = expert_capacity(x_TD.shape[0], self.top_k, self.num_experts, capacity_factor)
            topk_ids_TK = drop_over_capacity(topk_ids_TK, self.num_experts, capacity)

        x_in_TD, weights_TK = x_TD, route.topk_weights_TK
        if self.moe.expert_input_scaling:  # Llama 4: scale the (single) expert's input; combine with weight 1
            x_in_TD, weights_TK = x_TD * weights_TK.to(x_TD.dtype), torch.ones_like(weights_TK)
        # The balance counts are known now: their reduction over the ranks runs while the tokens travel.
        counts = self._count(route, topk_ids_TK)
        # Dropless plans tell the dispatcher so, which then needs no device sync to count the kept rows.
        may_drop = not self.router.fills_every_slot or capacity_factor is not None or (
            self.moe.device_capacity_factor is not None)
        x_ND, num_tokens_per_local_expert_E = self.dispatcher.dispatch(x_in_TD, topk_ids_TK, weights_TK, may_drop)
        y_ND = self.experts(x_ND, num_tokens_per_local_expert_E)
        shared: list[torch.Tensor] = []

        def shared_expert() -> None:  # the dispatcher runs it while the combine is in flight (parallel.overlap)
            shared_TD = self.shared(x_TD)
            if self.shared_gate is not None:
                shared_TD = torch.sigmoid(self.shared_gate(x_TD)) * shared_TD
            shared.append(shared_TD)

        y_TD = self.dispatcher.combine(y_ND, overlap=shared_expert if self.shared is not None else None)
        if self.shared is not None:
            y_TD = y_TD + shared[0]

        aux_terms, stats = self._balance(route, B, counts)
        return y_TD.view(B, T_row, D), MoELayerOutput(aux_terms, stats)

    def _count(self, route: RouterOutput, kept_ids_TK: torch.Tensor) -> _Counts:
        """The balance counts of this rank's tokens, packed for ONE `count_reducer` call (a single all-reduce under
        data parallelism), and the bias load. Returns a function giving the reduced counts, the `_TG` device mask
        and whether the router added extras. A reducer with a `start(t)` method (`parallel/`'s) is started here
        and the function collects its result: `_balance` needs it only after the combine. `kept_ids_TK` (after
        capacity drops) only feeds the dropped count; everything else is the router's selection before them."""
        E, G = self.num_experts, self.num_devices
        ids_TK, T = route.topk_ids_TK, route.topk_ids_TK.shape[0]
        with torch.no_grad():
            selected_E = losses.expert_counts(ids_TK, E)
            device_mask_TG = losses.token_device_mask(ids_TK, E, G)
            num_dropped = ((kept_ids_TK < 0) & (ids_TK >= 0)).sum()  # slots the router left empty are no drop
            if self.training and self.count_load and self.expert_load_E is not None:
                self.expert_load_E += selected_E.long()
            # fp64 keeps counts of large global batches exact.
            extras = self.router.count_extras(route)
            parts = [selected_E, device_mask_TG.sum(0), selected_E.new_tensor([T]), num_dropped.view(1)]
            packed = torch.cat(parts if extras is None else [*parts, extras.float()]).double()
            start = getattr(self.count_reducer, "start", None)
            if start is not None:
                return _Counts(start(packed), device_mask_TG, extras is not None)
            reduced = self.count_reducer(packed)
        return _Counts(lambda: reduced, device_mask_TG, extras is not None)

    def _balance(
        self, route: RouterOutput, B: int, counts: _Counts
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Balance terms and stats from `_count`'s counts, all from the router's selection before capacity drops
        (per-device and per-expert): they are meant to steer what the router chooses; `dropped_frac` is the fraction
        of assignments dropped by either.

        The device terms (V2's L_DevBal and L_CommBal, defined there over D device groups) and the per-device
        statistics use the G = `num_devices` devices of the current layout (ep_size), not the routing groups:
        they measure the computation and traffic of the devices that really exist in this run."""
        E, K, G = self.num_experts, self.top_k, self.num_devices
        device_mask_TG = counts.device_mask_TG
        with torch.no_grad():
            packed = counts.reduced()
            extras = packed[E + G + 2 :] if counts.has_extras else None
            num_tokens_per_expert_E, num_tokens_sent_G = packed[:E], packed[E : E + G]
            num_tokens, num_dropped = packed[E + G], packed[E + G + 1]

        inputs = BalanceInputs(num_tokens_per_expert_E, num_tokens, num_tokens_sent_G, B, G, extras)
        aux = self.router.balance_terms(route, inputs)

        load_E = num_tokens_per_expert_E.float()
        devices_per_token_T = device_mask_TG.sum(-1).float()
        # A device's load is the token copies its experts (the placement's block) process; what it receives is
        # the tokens sent to it, a token counted once however many of its experts it picks.
        load_G = ExpertPlacement(E, G).sum_per_rank(load_E)
        received_G = num_tokens_sent_G.float()
        stats = {
            "tokens_per_expert_E": load_E,
            "dropped_frac": (num_dropped / (num_tokens * K)).float(),
            "devices_per_token_max": devices_per_token_T.max(),
            "devices_per_token_mean": devices_per_token_T.mean(),
            "a2a_tokens_sent": self.dispatcher.stats.get("a2a_tokens_sent", 0),
            "tokens_per_device_G": load_G,
            "tokens_received_per_device_G": received_G,
        }
        return aux, stats
