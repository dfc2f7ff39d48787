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
