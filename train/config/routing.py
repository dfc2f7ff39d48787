"""Routing groups: the expert blocks that `model.moe.device_limit` counts, fixed once per model.

With `device_limit` = M and `routing_groups` = G, a token may use experts of at most M of the G contiguous blocks
of E/G routed experts (DeepSeek-V2's device-limited routing, a block scoring as its best expert). G belongs to
the model, not to the layout, so a model computes the same function in one process and on any number of
expert-parallel ranks. The rule, stated here once (the trainer, `trainer.init_from` and `load_config` follow it):

- An explicit `model.moe.routing_groups=G` is used as given, on any `parallel.ep_size`.
- null with `device_limit` set is resolved at the run's first start to that run's `parallel.ep_size` (so a new
  run limits exactly its devices, as device-limited routing always did), and the resolved value is written to
  the run's config.yaml and to every checkpoint's config.yaml.
- A resumed run (`trainer.resume`), `trainer.init_from`, `train.generate` and `convert_hf.py export` use the
  value stored in the checkpoint's config.yaml whatever their ep_size; an explicit value that contradicts it is
  an error. A checkpoint that stores null (no device limit yet) leaves a later run free to resolve it.
- A config.yaml written before this field existed routed over its `parallel.ep_size` when it had a device limit:
  `stored_routing_groups` reads it as that value.
- null with `device_limit` null stays null: nothing is limited.

Only the selection uses G. The device and communication balance terms, the `moe/devices_per_token_*` metrics
and the device capacity measure the actual devices of the current layout (`MoELayer.num_devices` = ep_size).
"""
from __future__ import annotations

from typing import Optional

from train.config.errors import ConfigError
from train.config.model import MoEConfig, check_group_limit  # noqa: F401 (re-exported)


def device_limit_groups(moe: MoEConfig) -> Optional[tuple[int, int]]:
    """(G, M) when the device limit restricts a resolved model's selection (M < G), else None."""
    G, M = moe.routing_groups, moe.device_limit
    return (G, M) if G is not None and M is not None and M < G else None


def stored_routing_groups(moe: MoEConfig, stored_ep_size: int) -> Optional[int]:
    """The routing groups of a model read from a config.yaml saved with `parallel.ep_size` = `stored_ep_size`:
    its `routing_groups`, or, for a file written before that field existed, the ep_size its device limit ran on."""
    if moe.routing_groups is None and moe.device_limit is not None:
        return stored_ep_size
    return moe.routing_groups


def resolve_routing_groups(moe: MoEConfig, ep_size: int, stored: Optional[MoEConfig] = None,
                           stored_where: str = "the checkpoint") -> Optional[int]:
    """The routing groups a run on `ep_size` expert-parallel ranks uses (the rule in this module's docstring).
    `stored` is the model config of the checkpoint the run continues (resume) or None. Raises a ConfigError
    naming the fields when the value contradicts the stored one or cannot hold the device limit."""
    mine = moe.routing_groups
    theirs = stored.routing_groups if stored is not None else None
    if mine is not None and theirs is not None and mine != theirs:
        raise ConfigError(
            f"model.moe.routing_groups={mine} contradicts {stored_where}, whose model routes over "
            f"model.moe.routing_groups={theirs} (fixed at its run's first start so that routing does not depend on "
            f"the number of ranks): drop the override; the stored value works on any parallel.ep_size")
    groups = mine if mine is not None else theirs
    E, K, M = moe.num_routed_experts, moe.num_active_routed, moe.device_limit
    if groups is not None:
        check_group_limit(E, K, groups, M, "model.moe.routing_groups", "model.moe.device_limit")
        return groups
    if M is None:
        return None
    try:
        check_group_limit(E, K, ep_size, M, "parallel.ep_size", "model.moe.device_limit")
    except ValueError as e:
        raise ConfigError(f"{e} (model.moe.routing_groups is null, so this run's first start sets it to "
                         f"parallel.ep_size; or set model.moe.routing_groups to the number of expert blocks the "
                         f"limit should count, on any ep_size)") from None
    return ep_size
