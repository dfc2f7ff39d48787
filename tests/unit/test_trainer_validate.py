"""Config validation: each impossible setting fails before any work with a ConfigError naming the field."""
from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException

from train.config import compose, load_train_config
from train.trainer.validate import ConfigError, typed_config, validate_config


def _check(overrides, match, world_size=1):
    cfg = load_train_config(overrides)
    with pytest.raises(ConfigError, match=match):
        validate_config(cfg, world_size=world_size)


def test_default_and_every_tiny_model_are_valid():
    for name in ("tiny_mixtral", "tiny_dbrx", "tiny_deepseek_moe", "tiny_deepseek_v2", "tiny_deepseek_v3"):
        validate_config(load_train_config([f"model={name}", "model.vocab_size=8192"]), world_size=1)


def test_experts_not_divisible_by_ep_size():
    # tiny_mixtral has 8 routed experts; 3 ranks of expert parallelism cannot split them.
    _check(["parallel.ep_size=3"], r"num_routed_experts=8.*parallel.ep_size=3", world_size=3)


def test_ep_size_must_divide_world():
    _check(["parallel.ep_size=2"], r"parallel.ep_size=2 does not divide the world size 3", world_size=3)


def test_top_k_larger_than_experts():
    _check(["model.moe.top_k=9"], r"model.moe.top_k=9")


def test_bad_granularity():
    _check(["model.moe.granularity=3"], r"model.moe.granularity=3 does not divide model.moe.expert_hidden=256")


def test_missing_data_path(tmp_path):
    _check(["data=files", f"data.paths=[{tmp_path}/nope/*.jsonl]"], r"data.paths: nothing matches")


def test_files_source_without_paths_is_a_config_error():
    _check(["data=files"], r"data.source=files needs data.paths")


def test_hf_source_without_name():
    _check(["data=hf"], r"data.source=hf needs a dataset: data.name=")


def test_hf_source_with_builtin_tokenizer_trains_on_the_stream_prefix():
    cfg = load_train_config(["data=hf", "data.name=some/dataset"])
    assert cfg.data.name == "some/dataset" and cfg.data.streaming and cfg.data.tokenizer == "builtin"
    validate_config(cfg, world_size=1)  # supported: the BPE is trained on the first data.max_corpus_mb MB
    _check(["data=hf", "data.name=some/dataset", "data.max_corpus_mb=0"],
           r"data.tokenizer=builtin trains on the first data.max_corpus_mb MB of the hf corpus")
    validate_config(load_train_config(["data=hf", "data.name=some/dataset", "data.max_corpus_mb=0",
                                       "data.tokenizer=gpt2"]), world_size=1)


def test_typed_config_converts():
    assert typed_config(compose(["trainer.max_steps=7"])).trainer.max_steps == 7


def test_unknown_key_fails_at_composition():
    with pytest.raises(ConfigCompositionException):
        compose(["model.moe.num_expertz=4"])
    with pytest.raises(ConfigCompositionException):
        compose(["trainer.max_step=4"])


@pytest.mark.parametrize("overrides, match", [
    (["trainer.global_batch_size=10", "trainer.micro_batch_size=4"], r"trainer.global_batch_size=10"),
    (["trainer.seq_len=4096"], r"trainer.seq_len=4096 must be between 1 and model.max_seq_len=2048"),
    (["precision.recipe=rowwise"], r"precision.recipe=rowwise only applies to precision=fp8 \(precision.name=fp32\)"),
    (["precision=bf16", "precision.recipe=blockwise"], r"precision.recipe=blockwise only applies to precision=fp8"),
    (["model.moe.device_limit=2"], r"model.moe.device_limit=2 must be between 1 and parallel.ep_size=1"),
    (["model.moe.device_capacity_factor=0"], r"model.moe.device_capacity_factor=0.0 must be > 0"),
    (["model.moe.num_groups=3"], r"model.moe.num_groups=3 must divide"),
    (["model.moe.num_groups=4", "model.moe.topk_groups=5"], r"model.moe.topk_groups=5"),
    (["trainer.resume=/definitely/not/here"], r"trainer.resume='/definitely/not/here'"),
    (["data.tokenizer_vocab_size=9000"], r"data.tokenizer_vocab_size=9000 exceeds model.vocab_size=8192"),
    (["parallel.a2a_dtype=fp8"], r"parallel.a2a_dtype=fp8 .* parallel.ep_size=1 has none"),
    (["trainer.watchdog_s=-1"], r"trainer.watchdog_s=-1 must be >= 0 .*0 disables the watchdog"),
])
def test_invalid_values(overrides, match):
    _check(overrides, match)


@pytest.mark.parametrize("override, allowed", [
    ("model.moe.scoring=softmax", "softmax_topk"), ("model.norm=batchnorm", "layernorm"),
    ("model.attention.kind=mqa", "mla"), ("precision.name=fp16", "bf16"), ("logging.wandb=maybe", "offline"),
    ("optim.schedule=linear", "wsd"), ("model.moe.router=nope", "expert_choice"), ("data.source=s3", "tokens"),
    ("trainer.device=tpu", "cuda"), ("trainer.activation_checkpointing=some", "selective"),
    ("model.attention.qk_norm=layer", "head"), ("model.ffn_activation=relu", "gelu_tanh"),
    ("model.moe.group_score=mean", "top2_sum"), ("parallel.backend=mpi", "gloo"), ("optim.name=sgd", "adamw"),
    ("model.family=mixtrall", "deepseek_v3"), ("parallel.a2a_dtype=fp16", "fp8"),
])
def test_a_choice_typo_fails_at_composition_naming_the_allowed_values(override, allowed):
    """Every choice field is an enum in the schema (train/config/choices.py): OmegaConf refuses a typo."""
    with pytest.raises(ConfigCompositionException) as e:
        compose([override])
    assert override.split("=")[0].split(".")[-1] in str(e.value.__cause__) and allowed in str(e.value.__cause__)


def test_choices_compare_and_print_as_their_strings():
    import json

    cfg = load_train_config(["precision=bf16", "model.moe.router=switch", "model.moe.top_k=1"])
    assert cfg.precision.name == "bf16" and f"{cfg.precision.name}" == "bf16" and str(cfg.model.moe.router) == "switch"
    assert json.dumps({"p": cfg.precision.name}) == '{"p": "bf16"}'


def test_errors_are_value_errors():
    assert issubclass(ConfigError, ValueError)


# DeepSpeed ZeRO: every check runs before the data and the model are built.
ZERO4 = ["model=tiny_deepseek_moe", "model.vocab_size=8192", "parallel.ep_size=2", "trainer.global_batch_size=16"]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stages_validate_on_four_ranks(stage):
    validate_config(load_train_config([*ZERO4, f"parallel.zero_stage={stage}"]), world_size=4)


@pytest.mark.parametrize("overrides,world,match", [
    (["parallel.zero_stage=4"], 4, r"parallel.zero_stage=4 must be 0 .* or a DeepSpeed ZeRO stage 1, 2 or 3"),
    (["parallel.zero_stage=2", "parallel.ep_size=1"], 1, r"parallel.zero_stage=2 partitions state over ranks"),
    (["parallel.zero_stage=2", "trainer.compile=true"], 4, r"trainer.compile=true is not supported"),
    (["parallel.zero_stage=0", "+parallel.deepspeed.gradient_clipping=1.0"], 4,
     r"parallel.deepspeed=.* parallel.zero_stage=0 does not use DeepSpeed"),
    (["parallel.zero_stage=2", "+parallel.deepspeed.gradient_clipping=5.0"], 4,
     r"parallel.deepspeed.gradient_clipping=5.0 contradicts optim.grad_clip \(which gives 1.0\)"),
    (["parallel.zero_stage=2", "+parallel.deepspeed.zero_optimization.stage=3"], 4,
     r"parallel.deepspeed.zero_optimization.stage=3 contradicts parallel.zero_stage \(which gives 2\)"),
    (["parallel.zero_stage=1", "+parallel.deepspeed.train_batch_size=64"], 4,
     r"parallel.deepspeed.train_batch_size=64 contradicts trainer.global_batch_size"),
    (["parallel.zero_stage=2", "+parallel.deepspeed.bf16.enabled=true"], 4, r"parallel.deepspeed.bf16.enabled=True"),
    (["parallel.zero_stage=2", "+parallel.deepspeed.optimizer.type=Adam"], 4,
     r"parallel.deepspeed.optimizer cannot be set: moeforge owns it through optim"),
    (["parallel.zero_stage=2", "+parallel.deepspeed.zero_optimization.no_such_knob=1"], 4,
     r"parallel.deepspeed.zero_optimization is not valid for DeepSpeed: .*no_such_knob"),
])
def test_zero_config_errors(overrides, world, match):
    _check([*ZERO4, *overrides], match, world_size=world)


def test_generated_deepspeed_config_follows_the_hydra_config():
    from parallel.zero.config import deepspeed_config

    cfg = load_train_config([*ZERO4, "parallel.zero_stage=3", "trainer.micro_batch_size=2", "optim.grad_clip=0.5",
                             "parallel.bucket_mb=8", "+parallel.deepspeed.zero_optimization.overlap_comm=true"])
    ds = deepspeed_config(cfg, accum_steps=2)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (16, 2, 2)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": False}
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["overlap_comm"] is True
    assert zero["reduce_bucket_size"] == zero["stage3_prefetch_bucket_size"] == 8 * 2**20 // 4


@pytest.mark.parametrize("overrides,match", [
    (["model.moe.capacity_factor=0.3"], r"model.moe.capacity_factor=0.3 would drop at least 70% of the token "
                                        r"assignments .* use >= 1.0"),
    (["model.moe.device_capacity_factor=0.2"], r"model.moe.device_capacity_factor=0.2 would drop at least 80%"),
])
def test_capacity_that_drops_most_tokens_is_rejected(overrides, match):
    _check(overrides, match)


def test_suspicious_but_workable_settings_are_warned_about():
    from train.trainer.validate import config_warnings

    assert config_warnings(load_train_config([])) == []
    warned = config_warnings(load_train_config(["optim.lr=0.5", "model.moe.capacity_factor=0.8"]))
    assert len(warned) == 2 and warned[0].startswith("optim.lr=0.5 is outside")
    assert "capacity_factor=0.8 < 1 drops at least 20%" in warned[1]


def test_data_without_one_window_is_an_error_before_the_model(tmp_path):
    """The data module's own check (train/data/sources.py), before any model is built. A corpus smaller than a
    global batch but holding whole windows repeats instead (tests/unit/test_data_tokens.py)."""
    from parallel import Mesh
    from train.trainer.loop import Trainer

    text = tmp_path / "tiny.jsonl"
    text.write_text('{"text": "hi there"}\n')
    cfg = load_train_config(["data=files", f"data.paths=[{text}]", "data.tokenizer_vocab_size=300",
                             "model.vocab_size=512", f"data.cache_dir={tmp_path / 'cache'}", "trainer.seq_len=16",
                             f"trainer.run_dir={tmp_path / 'run'}"])
    validate_config(cfg, world_size=1)
    with pytest.raises(ValueError, match=r"source files has \d+ tokens, \d+ before its held-out part: not one "
                                         r"window of trainer.seq_len\+1=17 tokens"):
        Trainer(cfg, Mesh())


@pytest.mark.parametrize("overrides,match", [
    (["model=tiny_switch", "model.moe.top_k=2"], "model.moe.router=switch sends each token to one expert"),
    (["model=tiny_gshard", "model.moe.top_k=1"], "model.moe.router=gshard is top-2"),
    (["model=tiny_expert_choice", "model.moe.expert_balance_coef=0.01"], "model.moe.expert_balance_coef is a token"),
    (["model=tiny_hash", "model.moe.capacity_factor=1.25"], "router=hash drops no tokens"),
    (["model=tiny_noisy_topk", "model.moe.bias_update_rate=0.001"], "model.moe.bias_update_rate"),
    (["model=tiny_mixtral", "model.moe.jitter_eps=0.01"], "model.moe.jitter_eps belongs to model.moe.router=switch"),
])
def test_routing_scheme_combinations(overrides, match):
    _check(overrides, match)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "blockwise"])
def test_fp8_recipes_are_valid(recipe):
    cfg = load_train_config(["model=tiny_deepseek_v3", "model.vocab_size=8192", "precision=fp8",
                             f"precision.recipe={recipe}"])
    validate_config(cfg, world_size=1)
    assert cfg.precision.recipe.value == recipe


def test_fp8_recipe_defaults_to_tensorwise_and_a_typo_names_the_field():
    assert load_train_config(["precision=fp8"]).precision.recipe.value == "tensorwise"
    with pytest.raises(ConfigCompositionException) as e:
        compose(["precision=fp8", "precision.recipe=blockwize"])
    assert "precision.recipe" in str(e.value.__cause__) and "blockwise" in str(e.value.__cause__)
