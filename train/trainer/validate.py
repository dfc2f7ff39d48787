"""Config validation, run first thing, before any process group, file or tensor exists.

Every check raises a `ConfigError` that names the offending field, its value and how to fix it, so a bad
sweep point fails in a second instead of after minutes of tokenizer training or on rank 7 of 64. Unknown
keys and wrong types never get here: the structured (typed) config already rejects them at composition.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path

from parallel.mesh import validate_parallel_config
from parallel.zero.config import check_deepspeed_config
from train.config import TrainConfig
from train.config.routing import check_group_limit, resolve_routing_groups
from train.data import check_batch_sizes
from train.trainer.peak_flops import MEASURE

SCORINGS = ("softmax_topk", "topk_softmax", "sigmoid")
GROUP_SCORES = ("max", "top2_sum")
NORMS = ("rmsnorm", "layernorm")
ATTENTION_KINDS = ("gqa", "mla")
PRECISIONS = ("fp32", "bf16", "fp8")
SCHEDULES = ("cosine", "wsd", "constant")
WANDB_MODES = ("disabled", "offline", "online")
DEVICES = ("auto", "cpu", "cuda")
ACTIVATION_CHECKPOINTING = ("none", "full", "selective")
DATA_SOURCES = ("stdlib", "hf", "files", "tokens")
MIN_CAPACITY_FACTOR = 0.5  # below it most token assignments are dropped
SANE_LR = (1e-6, 1e-2)  # AdamW peak learning rates outside this range are almost always a typo


class ConfigError(ValueError):
    """An impossible or unsupported configuration; the message says which field and what to do."""


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _one_of(field: str, value, allowed) -> None:
    _check(value in allowed, f"{field}={value!r} is not valid: choose one of {', '.join(map(str, allowed))}")


def _value(x):
    return getattr(x, "value", x)


def world_size_from_env() -> int:
    """The world size torchrun will give us, known before the process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def typed_config(dcfg) -> TrainConfig:
    """DictConfig -> typed TrainConfig, turning a missing mandatory value (`???`) into a ConfigError."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    try:
        return OmegaConf.to_object(dcfg)
    except MissingMandatoryValue as e:
        raise ConfigError(f"{e.full_key} must be set (it is ??? in its config group): pass {e.full_key}=...") from e


def config_warnings(cfg: TrainConfig) -> list[str]:
    """Settings that can work but usually are mistakes: printed before any work, the run goes on."""
    found = []
    lo, hi = SANE_LR
    if not lo <= cfg.optim.lr <= hi:
        found.append(f"optim.lr={cfg.optim.lr} is outside [{lo:g}, {hi:g}], where AdamW pretraining learning rates "
                     f"lie (1e-4 to 3e-3 at scale): check for a typo")
    for name in ("capacity_factor", "device_capacity_factor"):
        c = getattr(cfg.model.moe, name)
        if c is not None and c < 1.0:
            found.append(f"model.moe.{name}={c} < 1 drops at least {1 - c:.0%} of the token assignments even when "
                         f"perfectly balanced")
    return found


def validate_config(cfg: TrainConfig, world_size: int | None = None) -> None:
    """Raise `ConfigError` for the first problem found in `cfg` for a run on `world_size` ranks."""
    world = world_size_from_env() if world_size is None else world_size
    _validate_model(cfg)
    _validate_parallel(cfg, world)
    _validate_trainer(cfg, world)
    _validate_data(cfg)
    _validate_optim_logging(cfg)


def _validate_model(cfg: TrainConfig) -> None:
    m, moe = cfg.model, cfg.model.moe
    _one_of("model.norm", m.norm, NORMS)
    _one_of("model.attention.kind", m.attention.kind, ATTENTION_KINDS)
    _one_of("model.moe.scoring", moe.scoring, SCORINGS)
    _one_of("model.moe.group_score", moe.group_score, GROUP_SCORES)
    if m.attention.kind == "gqa":
        a = m.attention
        _check(a.num_kv_heads >= 1 and a.num_heads % a.num_kv_heads == 0,
               f"model.attention.num_heads={a.num_heads} must be a multiple of model.attention.num_kv_heads="
               f"{a.num_kv_heads}: set num_kv_heads to a divisor of num_heads")
    _check(moe.granularity >= 1, f"model.moe.granularity={moe.granularity} must be >= 1")
    _check(moe.expert_hidden % moe.granularity == 0,
           f"model.moe.granularity={moe.granularity} does not divide model.moe.expert_hidden={moe.expert_hidden}: "
           f"pick a granularity that divides it (expert width would be {moe.expert_hidden / moe.granularity:g})")
    n, k = moe.num_routed_experts, moe.num_active_routed
    _check(n >= 1, f"model.moe.num_experts={moe.num_experts} gives {n} routed experts: need at least 1")
    _check(1 <= k <= n,
           f"model.moe.top_k={moe.top_k} gives {k} active routed experts (granularity={moe.granularity}) but there "
           f"are {n} routed experts: set model.moe.top_k between 1 and {moe.num_experts}")
    try:  # the group rules live with the routing config, which the router checks too
        check_group_limit(n, k, moe.num_groups, moe.topk_groups, "model.moe.num_groups", "model.moe.topk_groups")
        if moe.routing_groups is not None:
            check_group_limit(n, k, moe.routing_groups, moe.device_limit, "model.moe.routing_groups",
                              "model.moe.device_limit")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for name in ("capacity_factor", "device_capacity_factor"):
        # capacity = factor x the average load, so a factor c < 1 drops at least 1 - c of the assignments: below
        # MIN_CAPACITY_FACTOR most of the batch would be dropped, which no recipe in the literature does
        c = getattr(moe, name)
        _check(c is None or c >= MIN_CAPACITY_FACTOR,
               f"model.moe.{name}={c} would drop at least {1 - c:.0%} of the token assignments "
               f"(capacity = {name} x the average load): use >= 1.0 (1.25 is GShard's), or null for dropless"
               if c is not None and c > 0 else f"model.moe.{name}={c} must be > 0 or null (dropless)")
    _check(m.mtp_depth >= 0, f"model.mtp_depth={m.mtp_depth} must be >= 0")
    _validate_router(m)


_ONE_EXPERT_ROUTERS = ("switch", "base", "hash")
_NO_TOKEN_CHOICE_TERMS = ("expert_choice", "base", "hash")


def _validate_router(m) -> None:
    """The combinations each routing scheme (train/model/moe/routers.py) supports; its constructor checks the
    same shapes, so a model built by hand fails too."""
    from train.model.moe.routers import ROUTERS

    moe = m.moe
    r = moe.router
    _one_of("model.moe.router", r, tuple(ROUTERS))
    k = moe.num_active_routed
    if r in _ONE_EXPERT_ROUTERS:
        _check(k == 1, f"model.moe.router={r} sends each token to one expert: set model.moe.top_k=1 (got {k} "
                       f"active routed experts)")
    if r == "gshard":
        _check(k == 2, f"model.moe.router=gshard is top-2: set model.moe.top_k=2 (got {k} active routed experts)")
    if r in ("switch", "gshard"):
        _check(moe.scoring == "softmax_topk", f"model.moe.router={r} gates with softmax probabilities: set "
                                              f"model.moe.scoring=softmax_topk")
    if r == "noisy_topk" and moe.load_coef:
        _check(k < moe.num_routed_experts, "model.moe.load_coef needs model.moe.top_k below the number of experts")
    if r != "topk":
        _check(not moe.uses_expert_bias, f"model.moe.bias_update_rate (DeepSeek-V3's selection bias) works with "
                                          f"model.moe.router=topk only, not {r}: set it to 0")
        _check(moe.num_groups == 1 and moe.device_limit is None,
               f"group- and device-limited routing (model.moe.num_groups, model.moe.device_limit) is topk's: "
               f"set model.moe.num_groups=1 and model.moe.device_limit=null for model.moe.router={r}")
    for name, owner in (("importance_coef", "noisy_topk"), ("load_coef", "noisy_topk"), ("jitter_eps", "switch")):
        _check(not getattr(moe, name) or r == owner,
               f"model.moe.{name} belongs to model.moe.router={owner}, not {r}: set it to 0")
    if r in _NO_TOKEN_CHOICE_TERMS:
        for name in ("expert_balance_coef", "device_balance_coef", "comm_balance_coef", "seq_balance_coef",
                     "device_capacity_factor"):
            _check(not getattr(moe, name), f"model.moe.{name} is a token-choice setting; model.moe.router={r} "
                                           f"balances by construction: set it to 0 (null for the capacity)")
    if r in ("base", "hash"):
        _check(moe.capacity_factor is None and moe.eval_capacity_factor is None,
               f"model.moe.router={r} drops no tokens: set model.moe.capacity_factor=null")
        _check(r != "hash" or not moe.z_loss_coef, "model.moe.router=hash has no router logits: set "
                                                   "model.moe.z_loss_coef=0")
    if r == "hash":
        _check(m.mtp_depth == 0, "model.moe.router=hash needs the token ids, which multi-token-prediction modules do "
                                 "not pass: set model.mtp_depth=0")


def _validate_parallel(cfg: TrainConfig, world: int) -> None:
    try:  # the layout rules live with the code that builds the layout
        validate_parallel_config(cfg, world)
        if not _may_resume(cfg.trainer):
            # The routing groups a new run's first start resolves (the trainer resolves them again, with the
            # checkpoint's value when it resumes one: then the stored groups, not this ep_size, bound the limit).
            resolve_routing_groups(cfg.model.moe, cfg.parallel.ep_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    stage = cfg.parallel.zero_stage
    _check(stage in (0, 1, 2, 3), f"parallel.zero_stage={stage} must be 0 (moeforge's data parallelism) or a "
                                  f"DeepSpeed ZeRO stage 1, 2 or 3")
    _check(cfg.parallel.bucket_mb > 0, f"parallel.bucket_mb={cfg.parallel.bucket_mb} must be > 0")
    if stage == 0:
        _check(not cfg.parallel.deepspeed, f"parallel.deepspeed={cfg.parallel.deepspeed} is set but "
                                           f"parallel.zero_stage=0 does not use DeepSpeed: set parallel.zero_stage")
        return
    _check(world > 1, f"parallel.zero_stage={stage} partitions state over ranks, and this run has one: launch "
                      f"several with torchrun --nproc_per_node=N, or use parallel.zero_stage=0")
    _check(not cfg.trainer.compile, f"trainer.compile=true is not supported with parallel.zero_stage={stage} "
                                    f"yet: use trainer.compile=false, or parallel.zero_stage=0")
    try:  # batch sizes first: the DeepSpeed config is derived from them
        accum_steps = check_batch_sizes(cfg.trainer, world)
        check_deepspeed_config(cfg, accum_steps)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _may_resume(t) -> bool:
    """Whether the run may continue a checkpoint: `trainer.resume` is a path, or `auto` with a complete checkpoint
    in `trainer.run_dir` (a multirun job's own sub-directory is not known yet: its parent is looked at)."""
    from train.checkpoint import newest_complete

    if t.resume == "never":
        return False
    return t.resume != "auto" or (bool(t.run_dir) and newest_complete(Path(t.run_dir)) is not None)


def _validate_trainer(cfg: TrainConfig, world: int) -> None:
    t = cfg.trainer
    _check(t.max_steps >= 1, f"trainer.max_steps={t.max_steps} must be >= 1")
    _check(t.micro_batch_size >= 1, f"trainer.micro_batch_size={t.micro_batch_size} must be >= 1")
    try:  # the data module owns the accumulation arithmetic; its message suggests sizes that would divide
        check_batch_sizes(t, world)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check(1 <= t.seq_len <= cfg.model.max_seq_len,
           f"trainer.seq_len={t.seq_len} must be between 1 and model.max_seq_len={cfg.model.max_seq_len}")
    _check(t.save_every >= 1, f"trainer.save_every={t.save_every} must be >= 1")
    _check(t.max_bad_steps >= 1, f"trainer.max_bad_steps={t.max_bad_steps} must be >= 1")
    _check(t.keep_last is None or t.keep_last >= 1,
           f"trainer.keep_last={t.keep_last} must be >= 1 (or null to keep every checkpoint)")
    _check(t.eval_every >= 0, f"trainer.eval_every={t.eval_every} must be >= 0 (0 disables validation)")
    _check(t.eval_batches >= 1, f"trainer.eval_batches={t.eval_batches} must be >= 1")
    _one_of("trainer.device", t.device, DEVICES)
    _one_of("trainer.activation_checkpointing", t.activation_checkpointing, ACTIVATION_CHECKPOINTING)
    _validate_peak_flops(t.peak_flops)
    if t.resume not in ("auto", "never"):
        _check(Path(t.resume).expanduser().exists(),
               f"trainer.resume={t.resume!r} is neither auto, never nor an existing checkpoint or run dir")
    if t.init_from is not None:
        _check(Path(t.init_from).expanduser().exists(),
               f"trainer.init_from={t.init_from!r} does not exist: pass a checkpoint dir or a run dir")
    _one_of("precision.name", cfg.precision.name, PRECISIONS)
    # the recipe's choices are an enum in the schema (a typo fails at composition); here only its scope
    _check(cfg.precision.recipe is None or cfg.precision.name == "fp8",
           f"precision.recipe={_value(cfg.precision.recipe)} only applies to precision=fp8 (precision.name="
           f"{cfg.precision.name}): drop the override or use precision=fp8")


def _validate_peak_flops(value) -> None:
    """The config types it Any (OmegaConf has no float-or-string union), so the choices are checked here."""
    choices = f"choose null (the device's table value), a number (FLOP/s per device) or {MEASURE}"
    if isinstance(value, str):
        _check(value == MEASURE, f"trainer.peak_flops={value!r} is not valid: {choices}")
    elif value is not None:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool),
               f"trainer.peak_flops={value!r} is not valid: {choices}")
        _check(value > 0, f"trainer.peak_flops={value} must be > 0: {choices}")


def _validate_data(cfg: TrainConfig) -> None:
    d = cfg.data
    _one_of("data.source", d.source, DATA_SOURCES)
    if d.source == "hf":
        _check(bool(d.name), "data.source=hf needs a dataset: data.name=<hub dataset name or local dataset folder>")
    if d.source == "files":
        _check(len(d.paths) > 0, "data.source=files needs data.paths='[/path/a.jsonl,/path/dir/*.txt]'")
        missing = [p for p in d.paths if not glob.glob(os.path.expanduser(p))]
        _check(not missing, f"data.paths: nothing matches {missing}: fix the path(s) or the glob(s)")
    if d.source == "tokens":
        _validate_token_data(d)
    else:
        _check(bool(d.tokenizer), "data.tokenizer is empty: use builtin or a Hugging Face tokenizer name or path")
        _check(d.weights is None, f"data.weights={d.weights} only applies to data.source=tokens (one per data.paths "
               f"entry): drop it")
    if d.tokenizer == "builtin":
        # The BPE is trained on the first data.max_corpus_mb MB of the corpus (of the stream, unshuffled, when
        # data.streaming), so that budget must be positive whatever the source.
        _check(d.max_corpus_mb > 0,
               f"data.tokenizer=builtin trains on the first data.max_corpus_mb MB of the {d.source} corpus, but "
               f"data.max_corpus_mb={d.max_corpus_mb}: set it > 0, or pass data.tokenizer=<HF tokenizer name/path>")
        _check(d.tokenizer_vocab_size <= cfg.model.vocab_size,
               f"data.tokenizer_vocab_size={d.tokenizer_vocab_size} exceeds model.vocab_size={cfg.model.vocab_size}: "
               f"token ids would not fit the embedding; lower data.tokenizer_vocab_size or raise model.vocab_size")
    _check(0.0 <= d.val_fraction < 1.0, f"data.val_fraction={d.val_fraction} must be in [0, 1)")


def _validate_token_data(d) -> None:
    """data=tokens: paths given, one finite positive weight per path; the files themselves are checked by
    build_data (train/data/sources.py), still before the model is built."""
    _check(len(d.paths) > 0, "data.source=tokens needs data.paths='[/data/web,/data/code]' (token-file prefixes, "
           "directories or globs)")
    if d.weights is not None:
        _check(len(d.weights) == len(d.paths),
               f"data.weights has {len(d.weights)} entries but data.paths has {len(d.paths)}: give one weight per "
               f"path (or data.weights=null for equal weights)")
        for path, w in zip(d.paths, d.weights):
            _check(w == w and w not in (float("inf"), float("-inf")) and w > 0,
                   f"data.weights: {w} for {path} must be a positive finite number: drop the path from data.paths "
                   f"rather than weighting it 0")
    _check(d.tokenizer != "builtin",
           "data.tokenizer=builtin trains a tokenizer on text, but data.source=tokens reads token ids: use "
           "data.tokenizer=null (the manifests' tokenizer) or the directory/name the files were written with")


def _validate_optim_logging(cfg: TrainConfig) -> None:
    o = cfg.optim
    _check(o.name == "adamw", f"optim.name={o.name!r} is not valid: only adamw is implemented")
    _one_of("optim.schedule", o.schedule, SCHEDULES)
    _check(o.lr > 0, f"optim.lr={o.lr} must be > 0")
    _check(0.0 <= o.min_lr_ratio <= 1.0, f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
    _check(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    _check(0.0 <= o.decay_frac <= 1.0, f"optim.decay_frac={o.decay_frac} must be in [0, 1]")
    _one_of("logging.wandb", cfg.logging.wandb, WANDB_MODES)
    _check(cfg.logging.log_every >= 1, f"logging.log_every={cfg.logging.log_every} must be >= 1")
