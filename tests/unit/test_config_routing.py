"""The routing-groups rule (train/config/routing.py): resolved once, at a run's first start, then read from the
checkpoint whatever the ep_size; its checks, the legacy reading of old config.yaml files, init_from and validation."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from train.checkpoint import load_config
from train.config import load_train_config
from train.config.routing import resolve_routing_groups
from train.trainer.init_from import merge_model_config
from train.trainer.validate import ConfigError, validate_config

UNGROUPED_V3 = ["model=tiny_deepseek_v3", "model.moe.num_groups=1", "model.moe.topk_groups=1"]  # 16 experts, top 4


def moe(*overrides):
    return load_train_config([*UNGROUPED_V3, *overrides]).model.moe


def test_a_new_run_resolves_to_its_ep_size_only_with_a_device_limit():
    assert resolve_routing_groups(moe("model.moe.device_limit=2"), ep_size=4) == 4
    assert resolve_routing_groups(moe("model.moe.device_limit=1"), ep_size=1) == 1
    assert resolve_routing_groups(moe(), ep_size=4) is None  # nothing to limit: stays null
    assert resolve_routing_groups(moe("model.moe.device_limit=2", "model.moe.routing_groups=8"), ep_size=2) == 8


def test_a_resumed_run_keeps_the_stored_groups_on_any_ep_size():
    stored = moe("model.moe.device_limit=2", "model.moe.routing_groups=4")
    for ep in (1, 2, 4, 8):
        assert resolve_routing_groups(moe("model.moe.device_limit=2"), ep, stored) == 4
    assert resolve_routing_groups(moe("model.moe.device_limit=2", "model.moe.routing_groups=4"), 2, stored) == 4
    # A checkpoint without a device limit stored null: a later run that adds one resolves it to its own ep_size.
    assert resolve_routing_groups(moe("model.moe.device_limit=2"), 2, moe()) == 2


def test_an_override_that_contradicts_the_checkpoint_is_an_error():
    stored = moe("model.moe.device_limit=2", "model.moe.routing_groups=4")
    with pytest.raises(ValueError, match=r"model.moe.routing_groups=2 contradicts the checkpoint.* "
                                         r"model.moe.routing_groups=4 .* drop the override"):
        resolve_routing_groups(moe("model.moe.device_limit=2", "model.moe.routing_groups=2"), 2, stored)


@pytest.mark.parametrize("overrides,ep,match", [
    (["model.moe.device_limit=2"], 1, r"model.moe.device_limit=2 must be between 1 and parallel.ep_size=1 "
                                      r"\(model.moe.routing_groups is null"),
    (["model.moe.device_limit=3", "model.moe.routing_groups=2"], 4,
     r"model.moe.device_limit=3 must be between 1 and model.moe.routing_groups=2"),
    (["model.moe.routing_groups=3"], 1, r"model.moe.routing_groups=3 must divide the 16 routed experts"),
    (["model.moe.device_limit=1", "model.moe.routing_groups=8"], 1,
     r"model.moe.device_limit=1 groups of 2 experts cannot hold top_k=4"),
])
def test_impossible_groups_name_the_fields(overrides, ep, match):
    with pytest.raises(ValueError, match=match):
        resolve_routing_groups(moe(*overrides), ep)


def test_validation_checks_groups_and_a_new_runs_ep_size_but_not_a_resumed_one(tmp_path):
    base = [*UNGROUPED_V3, "model.vocab_size=8192"]
    # Explicit groups hold the limit on one process: a device-limited model runs there as it does on 4 ranks.
    validate_config(load_train_config([*base, "model.moe.device_limit=2", "model.moe.routing_groups=4"]), 1)
    with pytest.raises(ConfigError, match=r"model.moe.routing_groups=3 must divide"):
        validate_config(load_train_config([*base, "model.moe.routing_groups=3"]), 1)
    with pytest.raises(ConfigError, match=r"model.moe.device_limit=2 must be between 1 and parallel.ep_size=1"):
        validate_config(load_train_config([*base, "model.moe.device_limit=2"]), 1)
    # A run dir with a checkpoint: the groups will come from it (checked by the trainer), not from this ep_size.
    (tmp_path / "checkpoints" / "step_00000001").mkdir(parents=True)
    for name in ("model.safetensors", "COMPLETE"):
        (tmp_path / "checkpoints" / "step_00000001" / name).write_text("")
    validate_config(load_train_config([*base, "model.moe.device_limit=2", f"trainer.run_dir={tmp_path}"]), 1)


def test_a_config_written_before_routing_groups_existed_routes_over_its_ep_size(tmp_path):
    cfg = load_train_config([*UNGROUPED_V3, "model.moe.device_limit=2", "parallel.ep_size=4"])
    stored = OmegaConf.to_container(OmegaConf.structured(cfg))
    del stored["model"]["moe"]["routing_groups"]
    OmegaConf.save(OmegaConf.create(stored), tmp_path / "config.yaml")
    assert load_config(tmp_path).model.moe.routing_groups == 4
    cfg.model.moe.device_limit = None  # no limit then: nothing was resolved
    OmegaConf.save(OmegaConf.structured(cfg), tmp_path / "config.yaml")
    assert load_config(tmp_path).model.moe.routing_groups is None


def test_init_from_takes_the_checkpoints_groups_and_rejects_a_contradiction():
    ckpt = load_train_config([*UNGROUPED_V3, "model.moe.device_limit=2", "model.moe.routing_groups=4"]).model
    run = load_train_config([*UNGROUPED_V3, "model.moe.routing_groups=2"]).model
    assert merge_model_config(load_train_config(UNGROUPED_V3).model, ckpt, [], "ck").moe.routing_groups == 4
    with pytest.raises(ConfigError, match=r"model.moe.routing_groups=2 contradicts trainer.init_from"):
        merge_model_config(run, ckpt, ["moe.routing_groups"], "ck")
    unresolved = load_train_config(UNGROUPED_V3).model  # the checkpoint never had a device limit
    assert merge_model_config(run, unresolved, ["moe.routing_groups"], "ck").moe.routing_groups == 2
