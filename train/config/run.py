"""Typed configuration of everything around the model: parallelism, precision, data, optimizer,
trainer and logging. `TrainConfig` is the root that `configs/train.yaml` fills in."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from train.config.choices import (
    A2aDtype, ActivationCheckpointing, Backend, DataSource, Device, Fp8Recipe, OnSaveError, OptimName, Precision,
    Schedule, WandbMode,
)
from train.config.choices import PpSchedule
from train.config.errors import check, one_of
from train.config.model import ModelConfig

MEASURE = "measure"  # trainer.peak_flops: time a matmul (train/trainer/peak_flops.py)


@dataclass
class ParallelConfig:
    ep_size: int = 1  # expert-parallel degree; world / ep_size ranks form each expert-data-parallel group
    # 0: moeforge's own data parallelism; 1, 2, 3: DeepSpeed ZeRO partitions optimizer state / + gradients /
    # + parameters (parallel/zero/). The DeepSpeed config is generated from this whole config.
    zero_stage: int = 0
    backend: Backend = Backend.auto  # auto: nccl on GPUs, gloo on CPU
    bucket_mb: float = 32.0  # gradient reduction bucket (MiB of fp32), for stage 0 and DeepSpeed's buckets alike
    # Extra DeepSpeed config keys merged onto the generated ones, e.g. {zero_optimization: {overlap_comm: true}};
    # a key that contradicts a value moeforge generates is an error naming both.
    deepspeed: Dict[str, Any] = field(default_factory=dict)
    # auto: the dispatch all-to-all sends token rows in the compute dtype; fp8: as e4m3 with one fp32 scale per
    # 128 values (DeepSeek-V3), dequantized on arrival, gradients back in the compute dtype. Needs ep_size > 1.
    a2a_dtype: A2aDtype = A2aDtype.auto
    # Compute the shared expert while the combine's all-to-all is in flight (expert parallelism only); the same
    # results either way.
    overlap: bool = True
    # Pipeline parallelism: pp_size stages of consecutive layers, the embedding on the first, the head and MTP
    # modules on the last (parallel/pipeline.py); the rules that need the model or the world size are in
    # train/config/pipeline.py.
    pp_size: int = 1
    pp_schedule: PpSchedule = PpSchedule["1f1b"]  # 1f1b | interleaved_1f1b | zero_bubble
    pp_virtual_stages: int = 1  # model chunks per rank: >= 2 for interleaved_1f1b, 1 otherwise
    # transformer layers per chunk, pp_size x pp_virtual_stages entries in pipeline order (chunk c on rank
    # c % pp_size) summing to model.num_layers; null: an even split (the layer count must divide)
    pp_layout: Optional[List[int]] = None

    def validate(self) -> None:
        """The layout's own rules; those that need the world size live with the mesh (`parallel.mesh`)."""
        self._validate_pipeline()
        one_of("parallel.backend", self.backend, Backend)
        one_of("parallel.a2a_dtype", self.a2a_dtype, A2aDtype)
        check(self.a2a_dtype == A2aDtype.auto or self.ep_size > 1,
              f"parallel.a2a_dtype={self.a2a_dtype} sets what expert parallelism's all-to-all sends, but "
              f"parallel.ep_size={self.ep_size} has none: drop the override or set parallel.ep_size > 1")
        check(self.ep_size >= 1, f"parallel.ep_size={self.ep_size} must be >= 1")
        check(self.zero_stage in (0, 1, 2, 3), f"parallel.zero_stage={self.zero_stage} must be 0 (moeforge's data "
                                               f"parallelism) or a DeepSpeed ZeRO stage 1, 2 or 3")
        check(self.bucket_mb > 0, f"parallel.bucket_mb={self.bucket_mb} must be > 0")
        check(self.zero_stage != 0 or not self.deepspeed,
              f"parallel.deepspeed={self.deepspeed} is set but parallel.zero_stage=0 does not use DeepSpeed: set "
              f"parallel.zero_stage")

    def _validate_pipeline(self) -> None:
        one_of("parallel.pp_schedule", self.pp_schedule, PpSchedule)
        check(self.pp_size >= 1, f"parallel.pp_size={self.pp_size} must be >= 1")
        v = self.pp_virtual_stages
        if self.pp_schedule == "interleaved_1f1b":
            check(v >= 2, f"parallel.pp_schedule=interleaved_1f1b needs parallel.pp_virtual_stages >= 2 model "
                          f"chunks per rank (it is {v}), or use parallel.pp_schedule=1f1b")
        else:
            check(v == 1, f"parallel.pp_virtual_stages={v} only applies to parallel.pp_schedule=interleaved_1f1b "
                          f"(parallel.pp_schedule={self.pp_schedule}): set it to 1 or switch the schedule")
        check(self.pp_size > 1 or (self.pp_schedule == "1f1b" and self.pp_layout is None),
              f"parallel.pp_schedule={self.pp_schedule} / parallel.pp_layout={self.pp_layout} describe a pipeline, "
              f"but parallel.pp_size=1 has none: drop them or set parallel.pp_size > 1")
        if self.pp_layout is not None:
            n = self.pp_size * v
            check(len(self.pp_layout) == n and all(c >= 0 for c in self.pp_layout),
                  f"parallel.pp_layout={list(self.pp_layout)} must have parallel.pp_size x parallel.pp_virtual_stages"
                  f" = {self.pp_size} x {v} = {n} entries, each a layer count >= 0")
        check(self.pp_size == 1 or self.zero_stage in (0, 1),
              f"parallel.zero_stage={self.zero_stage} with parallel.pp_size={self.pp_size}: ZeRO 2 and 3 partition "
              f"gradients / parameters that every micro-batch of a pipeline would reduce or gather again; use "
              f"parallel.zero_stage=1 (DeepSeek-V3's layout) or 0")


@dataclass
class PrecisionConfig:
    # fp32 | bf16 | bf16_autocast | fp8: the recipe (train/precision/). Parameters, gradients and optimizer
    # state always stay fp32 (master weights); bf16 computes in bf16 end to end from bf16 copies of them
    # (router, norms' statistics and losses fp32; every ZeRO stage); bf16_autocast autocasts the forward pass
    # over fp32 weights; fp8 builds on bf16 and runs the dense attention/MLP linears and the routed-expert
    # GEMMs in FP8.
    name: Precision = Precision.fp32
    # fp8 only (configs/precision/fp8.yaml sets tensorwise): tensorwise | rowwise | blockwise. Must stay null
    # with fp32 and bf16, where it would mean nothing (validation says so rather than ignoring it).
    recipe: Optional[Fp8Recipe] = None

    def validate(self) -> None:
        one_of("precision.name", self.name, Precision)
        # the recipe's choices are an enum in the schema (a typo fails at composition); here only its scope
        check(self.recipe is None or self.name == Precision.fp8,
              f"precision.recipe={getattr(self.recipe, 'value', self.recipe)} only applies to precision=fp8 "
              f"(precision.name={self.name}): drop the override or use precision=fp8")


@dataclass
class DataConfig:
    # stdlib: the Python standard library sources shipped with the running interpreter (offline default)
    # hf: a Hugging Face dataset by name; files: local text/json/jsonl/parquet files; tokens: token files
    # (Megatron PREFIX.bin/.idx pairs or OLMo-core headerless .npy arrays) named by data.paths
    source: DataSource = DataSource.stdlib
    name: Optional[str] = None  # hf dataset name
    config_name: Optional[str] = None
    split: str = "train"
    # files: files or globs; tokens: prefixes, directories or globs of token files (one source per entry)
    paths: List[str] = field(default_factory=list)
    weights: Optional[List[float]] = None  # tokens: mixing weights, one per data.paths entry (normalised)
    token_dtype: Optional[str] = None  # tokens: dtype of headerless arrays (null: from the vocabulary size)
    text_field: str = "text"
    streaming: bool = False
    # "builtin": a byte-level BPE trained on the corpus with `tokenizers` and cached; else an HF name or path.
    # tokens: null = the tokenizer the manifests name (PREFIX.manifest.json); needed where there is none
    tokenizer: Optional[str] = "builtin"
    tokenizer_vocab_size: int = 8192
    # stdlib source: how much of it to use (deterministic file order); every source: the text the builtin
    # tokenizer is trained on (the first max_corpus_mb MB, of the unshuffled stream when streaming)
    max_corpus_mb: float = 24.0
    val_fraction: float = 0.01
    cache_dir: str = "${oc.env:MOEFORGE_CACHE,.cache/moeforge}"
    num_proc: int = 1
    # Packed rows hold several documents: keep attention within each document and restart positions at each
    # one (the model's `document_ids`); the data pipeline then adds `document_ids` to each micro-batch.
    document_mask: bool = False
    # Token files with a manifest are checked at every start by size (free), and by SHA-256 when their modification
    # time differs from the manifest's (once per new time). true: hash every file at every start, a full read of
    # the corpus (for file systems whose times cannot be trusted).
    verify_tokens: bool = False

    def validate(self) -> None:
        """The data config's own rules; whether its files exist is checked by `validate_config` (and read by
        `train.data`)."""
        one_of("data.source", self.source, DataSource)
        if self.source == DataSource.hf:
            check(bool(self.name), "data.source=hf needs a dataset: data.name=<hub dataset name or local dataset "
                                   "folder>")
        if self.source == DataSource.files:
            check(len(self.paths) > 0, "data.source=files needs data.paths='[/path/a.jsonl,/path/dir/*.txt]'")
        if self.source == DataSource.tokens:
            self._validate_tokens()
        else:
            check(bool(self.tokenizer), "data.tokenizer is empty: use builtin or a Hugging Face tokenizer name or "
                                        "path")
            check(self.weights is None, f"data.weights={self.weights} only applies to data.source=tokens (one per "
                                        f"data.paths entry): drop it")
        if self.tokenizer == "builtin":
            # The BPE is trained on the first data.max_corpus_mb MB of the corpus (of the stream, unshuffled, when
            # data.streaming), so that budget must be positive whatever the source.
            check(self.max_corpus_mb > 0,
                  f"data.tokenizer=builtin trains on the first data.max_corpus_mb MB of the {self.source} corpus, "
                  f"but data.max_corpus_mb={self.max_corpus_mb}: set it > 0, or pass data.tokenizer=<HF tokenizer "
                  f"name/path>")
        check(0.0 <= self.val_fraction < 1.0, f"data.val_fraction={self.val_fraction} must be in [0, 1)")

    def _validate_tokens(self) -> None:
        """data=tokens: paths given, one finite positive weight per path; the files themselves are checked by
        build_data (train/data/sources.py), still before the model is built."""
        check(len(self.paths) > 0, "data.source=tokens needs data.paths='[/data/web,/data/code]' (token-file "
                                   "prefixes, directories or globs)")
        if self.weights is not None:
            check(len(self.weights) == len(self.paths),
                  f"data.weights has {len(self.weights)} entries but data.paths has {len(self.paths)}: give one "
                  f"weight per path (or data.weights=null for equal weights)")
            for path, w in zip(self.paths, self.weights):
                check(w == w and w not in (float("inf"), float("-inf")) and w > 0,
                      f"data.weights: {w} for {path} must be a positive finite number: drop the path from "
                      f"data.paths rather than weighting it 0")
        check(self.tokenizer != "builtin",
              "data.tokenizer=builtin trains a tokenizer on text, but data.source=tokens reads token ids: use "
              "data.tokenizer=null (the manifests' tokenizer) or the directory/name the files were written with")


@dataclass
class OptimConfig:
    name: OptimName = OptimName.adamw
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    schedule: Schedule = Schedule.cosine  # cosine | wsd | constant
    warmup_steps: int = 20
    decay_frac: float = 0.2  # wsd: fraction of max_steps spent decaying

    def validate(self) -> None:
        one_of("optim.name", self.name, OptimName)
        one_of("optim.schedule", self.schedule, Schedule)
        check(self.lr > 0, f"optim.lr={self.lr} must be > 0")
        check(0.0 <= self.min_lr_ratio <= 1.0, f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        check(self.warmup_steps >= 0, f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        check(0.0 <= self.decay_frac <= 1.0, f"optim.decay_frac={self.decay_frac} must be in [0, 1]")


@dataclass
class TrainerConfig:
    run_dir: Optional[str] = None  # null: Hydra's output directory
    max_steps: int = 200
    global_batch_size: int = 16
    micro_batch_size: int = 4
    seq_len: int = 128
    seed: int = 1234
    save_every: int = 100
    max_bad_steps: int = 5  # consecutive skipped (non-finite) steps before the run stops with a checkpoint
    # A rank whose step stops advancing for this many seconds dumps every thread's stack and exits non-zero, so the
    # elastic launcher restarts the job (first step, saves and evaluations get 4x; collectives time out at 5x);
    # 0 disables it (train/trainer/watchdog.py).
    watchdog_s: int = 900
    keep_last: Optional[int] = None  # keep the newest N complete checkpoints (null: all); older ones go after a save
    # After a save fails part-way (full disk, file-size limit, I/O error; nothing older is touched): auto continues
    # training when an earlier complete checkpoint exists and stops when there is none; continue always continues;
    # stop stops at once. A failed final or preemption save always stops (no later save would retry it).
    on_save_error: OnSaveError = OnSaveError.auto
    max_save_failures: int = 3  # failed saves in a row after which a continuing run stops
    resume: str = "auto"  # auto | never | a checkpoint path
    init_from: Optional[str] = None
    eval_every: int = 50
    eval_batches: int = 4
    device: Device = Device.auto  # auto | cpu | cuda
    compile: bool = False
    # none | full | selective: recompute activations in backward (parallel/activation_checkpointing.py says what
    # each mode keeps); gradients are those of `none`.
    activation_checkpointing: ActivationCheckpointing = ActivationCheckpointing.none
    # Per-device peak FLOP/s for MFU: null picks the dense bf16 peak from the GPU's name (1e12 on CPU); a number;
    # or `measure`: a timed matmul in the run's compute dtype, cached per device (train/trainer/peak_flops.py).
    # Typed Any because OmegaConf has no float-or-string union: validate.py checks the value.
    peak_flops: Any = None
    # Run every check a start makes (config, data sources, model on the meta device, memory plan), print a
    # summary and a JSON line, exit 0; nothing is read, written or allocated (train/trainer/dry_run.py).
    dry_run: bool = False

    def validate(self) -> None:
        """The trainer's own rules; the batch sizes (which need the world size), `seq_len` against the model and
        the resume / init_from paths are checked by `validate_config`."""
        check(self.max_steps >= 1, f"trainer.max_steps={self.max_steps} must be >= 1")
        check(self.micro_batch_size >= 1, f"trainer.micro_batch_size={self.micro_batch_size} must be >= 1")
        check(self.save_every >= 1, f"trainer.save_every={self.save_every} must be >= 1")
        check(self.max_bad_steps >= 1, f"trainer.max_bad_steps={self.max_bad_steps} must be >= 1")
        check(self.watchdog_s >= 0, f"trainer.watchdog_s={self.watchdog_s} must be >= 0 (seconds without a finished "
                                    f"step before a rank counts as hung; 0 disables the watchdog)")
        check(self.keep_last is None or self.keep_last >= 1,
              f"trainer.keep_last={self.keep_last} must be >= 1 (or null to keep every checkpoint)")
        one_of("trainer.on_save_error", self.on_save_error, OnSaveError)
        check(self.max_save_failures >= 1, f"trainer.max_save_failures={self.max_save_failures} must be >= 1 (1: "
                                           f"stop at the first failed save, as trainer.on_save_error=stop does)")
        check(self.eval_every >= 0, f"trainer.eval_every={self.eval_every} must be >= 0 (0 disables validation)")
        check(self.eval_batches >= 1, f"trainer.eval_batches={self.eval_batches} must be >= 1")
        one_of("trainer.device", self.device, Device)
        one_of("trainer.activation_checkpointing", self.activation_checkpointing, ActivationCheckpointing)
        self._validate_peak_flops()

    def _validate_peak_flops(self) -> None:
        """Typed Any (OmegaConf has no float-or-string union), so the choices are checked here."""
        value = self.peak_flops
        choices = f"choose null (the device's table value), a number (FLOP/s per device) or {MEASURE}"
        if isinstance(value, str):
            check(value == MEASURE, f"trainer.peak_flops={value!r} is not valid: {choices}")
        elif value is not None:
            check(isinstance(value, (int, float)) and not isinstance(value, bool),
                  f"trainer.peak_flops={value!r} is not valid: {choices}")
            check(value > 0, f"trainer.peak_flops={value} must be > 0: {choices}")


@dataclass
class LoggingConfig:
    wandb: WandbMode = WandbMode.disabled  # disabled | offline | online
    project: str = "moeforge"
    entity: Optional[str] = None
    log_every: int = 10  # plain log line every N steps (batch systems)
    progress: bool = True  # progress bar when attached to a terminal

    def validate(self) -> None:
        one_of("logging.wandb", self.wandb, WandbMode)
        check(self.log_every >= 1, f"logging.log_every={self.log_every} must be >= 1")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
