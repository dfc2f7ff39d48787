"""The `trainer.init_from` config rule (train/trainer/init_from.py): architecture from the checkpoint,
training knobs from the command line when set there, contradicting architecture overrides rejected."""
from __future__ import annotations

import pytest

from train.config import load_train_config
from train.trainer.init_from import explicit_model_fields, merge_model_config
from train.trainer.validate import ConfigError


def model(*overrides):
    return load_train_config(list(overrides)).model


def test_architecture_from_checkpoint_knobs_from_command_line():
    ckpt = model("model=tiny_deepseek_v3")
    run = model("model=tiny_dbrx", "model.moe.seq_balance_coef=0.5", "model.moe.top_k=4")
    merged = merge_model_config(run, ckpt, explicit_model_fields(
        ["model=tiny_dbrx", "model.moe.seq_balance_coef=0.5", "model.moe.top_k=4"]), "ck")
    assert merged.family == "deepseek_v3" and merged.attention.kind == "mla" and merged.mtp_depth == ckpt.mtp_depth
    assert merged.moe.seq_balance_coef == 0.5  # set by the user: kept
    assert merged.moe.bias_update_rate == ckpt.moe.bias_update_rate  # not set: the checkpoint's
    assert merged.moe.expert_balance_coef == ckpt.moe.expert_balance_coef  # model= choice ignored


def test_contradicting_architecture_override_names_the_field():
    ckpt, run = model("model=tiny_mixtral"), model("model=tiny_mixtral", "model.d_model=64")
    with pytest.raises(ConfigError, match=r"model.d_model=64 contradicts"):
        merge_model_config(run, ckpt, ["d_model"], "ck")


def test_dropping_the_checkpoints_expert_bias_is_rejected():
    ckpt = model("model=tiny_deepseek_v3")
    run = model("model=tiny_deepseek_v3", "model.moe.bias_update_rate=0")
    with pytest.raises(ConfigError, match="bias_update_rate"):
        merge_model_config(run, ckpt, ["moe.bias_update_rate"], "ck")
    run = model("model=tiny_mixtral", "model.moe.bias_update_rate=0.01")  # enabling it is fine
    assert merge_model_config(run, model("model=tiny_mixtral"), ["moe.bias_update_rate"], "ck").moe.uses_expert_bias


def test_training_knobs_are_field_metadata_of_the_schema():
    """Which model fields a run may change is stated by the schema (`knob(...)`), not by a list beside it."""
    from train.config.model import training_knobs
    from train.trainer.init_from import TRAINING_KNOBS

    assert TRAINING_KNOBS == training_knobs()
    # once misfiled as architecture: training-only settings of the noisy top-k, Switch and BASE routers, and the
    # evaluation capacity
    for knob in ("moe.importance_coef", "moe.load_coef", "moe.jitter_eps", "moe.sinkhorn_iters",
                 "moe.eval_capacity_factor"):
        assert knob in TRAINING_KNOBS
    for arch in ("d_model", "moe.top_k", "moe.router", "moe.scoring", "moe.routing_groups", "attention.kind"):
        assert arch not in TRAINING_KNOBS
    ckpt = model("model=tiny_switch")
    run = model("model=tiny_switch", "model.moe.jitter_eps=0.05")
    assert merge_model_config(run, ckpt, ["moe.jitter_eps"], "ck").moe.jitter_eps == 0.05


def test_an_old_config_yaml_with_plain_strings_and_router_dtype_loads(tmp_path):
    """config.yaml files written before the enums (plain strings) and before router_dtype was dropped still load."""
    from omegaconf import OmegaConf

    from train.checkpoint import load_config
    from train.config import compose

    old = OmegaConf.to_container(compose(["model=tiny_switch", "precision=bf16"]), enum_to_str=True)
    old["model"]["moe"]["router_dtype"] = "float32"
    OmegaConf.save(OmegaConf.create(old), tmp_path / "config.yaml")
    cfg = load_config(tmp_path)
    assert cfg.model.moe.router == "switch" and cfg.precision.name == "bf16"
    assert not hasattr(cfg.model.moe, "router_dtype")
