"""Typed configuration of everything around the model: parallelism, precision, data, optimizer,
trainer and logging. `TrainConfig` is the root that `configs/train.yaml` fills in."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from train.config.choices import (
    ActivationCheckpointing, Backend, DataSource, Device, Fp8Recipe, OptimName, Precision, Schedule, WandbMode,
)
from train.config.model import ModelConfig


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


@dataclass
class PrecisionConfig:
    # fp32 | bf16 | fp8: the recipe (train/trainer/precision.py). Parameters and optimizer state always stay
    # fp32 (master weights); bf16 autocasts the forward pass; fp8 autocasts like bf16 and runs the dense
    # attention/MLP linears and the routed-expert GEMMs in FP8.
    name: Precision = Precision.fp32
    # fp8 only (configs/precision/fp8.yaml sets tensorwise): tensorwise | rowwise | blockwise. Must stay null
    # with fp32 and bf16, where it would mean nothing (validation says so rather than ignoring it).
    recipe: Optional[Fp8Recipe] = None


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
    keep_last: Optional[int] = None  # keep the newest N complete checkpoints (null: all); older ones go after a save
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


@dataclass
class LoggingConfig:
    wandb: WandbMode = WandbMode.disabled  # disabled | offline | online
    project: str = "moeforge"
    entity: Optional[str] = None
    log_every: int = 10  # plain log line every N steps (batch systems)
    progress: bool = True  # progress bar when attached to a terminal


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
