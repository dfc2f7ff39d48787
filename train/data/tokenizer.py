"""Tokenizers: a byte-level BPE trained on the corpus (`data.tokenizer=builtin`), or any Hugging Face
tokenizer by name or path. Either way the result is a `PreTrainedTokenizerFast` plus a directory in Hugging
Face format (tokenizer.json, tokenizer_config.json, special_tokens_map.json) that checkpoints copy and
`transformers.AutoTokenizer.from_pretrained(dir)` loads offline.

Training reads only three numbers of the tokenizer (EOS id, padding id, vocabulary size): `tokenizer_info` gives
them from the directory's files with the `tokenizers` library where that provably matches what
`AutoTokenizer` would say, so a rank's start imports no `transformers` (about a second per process);
`transformers` is imported where its API is used (training, saving or loading a `PreTrainedTokenizerFast`).

The builtin tokenizer is cached under `cache_dir/tokenizers/<key>/`, key = hash of the corpus fingerprint,
vocabulary size and training budget. It is written to a temporary directory and renamed into place, so
concurrent builders cannot leave a half-written cache: the first rename wins, the others discard theirs.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Tuple

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from train.config.run import DataConfig
from train.data.atomic import publish_dir
from train.data.corpus import Corpus, cache_root, iter_texts, load_corpus

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"  # separates documents (EOS of one = BOS of the next)
PAD_TOKEN = "<|pad|>"
_BUILTIN_VERSION = 1  # bump when the training recipe changes, to invalidate caches


def builtin_tokenizer_key(corpus_fingerprint: str, cfg: DataConfig) -> str:
    spec = {"v": _BUILTIN_VERSION, "corpus": corpus_fingerprint, "vocab": cfg.tokenizer_vocab_size,
            "max_mb": cfg.max_corpus_mb}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _training_texts(corpus: Corpus, max_mb: float) -> Iterator[str]:
    """The first `max_mb` MB of corpus text, in corpus order (a stream is read unshuffled)."""
    budget = int(max_mb * 1e6)
    for text in iter_texts(corpus.documents):
        if budget <= 0:
            return
        budget -= len(text.encode("utf-8", "replace"))
        yield text


def train_byte_bpe(texts: Iterator[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A GPT-2 style byte-level BPE of `vocab_size` entries (special tokens and the 256 byte symbols
    included), with `<|endoftext|>` as BOS/EOS and `<|pad|>` as padding."""
    if vocab_size < 256 + 2:
        raise ValueError(f"data.tokenizer_vocab_size={vocab_size} must be at least 258 "
                         "(256 byte symbols and 2 special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN,
                                   pad_token=PAD_TOKEN, clean_up_tokenization_spaces=False)


def save_atomic(tokenizer: PreTrainedTokenizerFast, final_dir: Path) -> None:
    """`save_pretrained` into a temporary sibling directory, then rename it to `final_dir`. If another
    process got there first, its copy is kept and ours is removed."""
    def write(tmp: Path) -> None:
        tokenizer.save_pretrained(str(tmp))
        special_map = tmp / "special_tokens_map.json"
        if not special_map.exists():  # transformers 5 stopped writing it; older readers and our layout want it
            special_map.write_text(json.dumps(tokenizer.special_tokens_map, indent=2, ensure_ascii=False) + "\n")

    publish_dir(final_dir, write, marker="tokenizer.json")


def _builtin_dir(cfg: DataConfig, corpus: Corpus) -> Path:
    return cache_root(cfg) / "tokenizers" / builtin_tokenizer_key(corpus.fingerprint, cfg)


def ensure_tokenizer(cfg: DataConfig, corpus: Optional[Corpus] = None) -> Path:
    """The tokenizer directory for `cfg`, building (builtin) or exporting (hub name) it if missing.
    Safe to call from several processes at once."""
    if cfg.tokenizer == "builtin":
        corpus = corpus or load_corpus(cfg)
        out = _builtin_dir(cfg, corpus)
        if not (out / "tokenizer.json").exists():
            save_atomic(train_byte_bpe(_training_texts(corpus, cfg.max_corpus_mb), cfg.tokenizer_vocab_size),
                        out)
        return out
    if os.path.isdir(os.path.expanduser(cfg.tokenizer)):
        return Path(os.path.expanduser(cfg.tokenizer))
    # A hub name: resolved by `from_pretrained` (its cache, or the network if the user is online), then
    # exported once so checkpoints have a local copy.
    out = cache_root(cfg) / "tokenizers" / ("hf--" + cfg.tokenizer.replace("/", "--"))
    if not (out / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        save_atomic(AutoTokenizer.from_pretrained(cfg.tokenizer), out)
    return out


# The files that define a tokenizer's behaviour, hashed by `tokenizer_fingerprint`.
FINGERPRINT_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                     "tokenizer.model")


def tokenizer_fingerprint(tokenizer_dir: Path) -> str:
    """Hash of the files that define the tokenizer's behaviour (token caches are keyed on it)."""
    digest = hashlib.sha256()
    for name in FINGERPRINT_FILES:
        path = Path(tokenizer_dir) / name
        if path.exists():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def open_tokenizer(tokenizer_dir: Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer directory offline and check it can separate documents; one that asks for remote code is
    refused before transformers reads it."""
    from train.config.errors import ConfigError
    from train.hf.folders import refuse_remote_code

    refuse_remote_code(Path(tokenizer_dir), "tokenizer", error=ConfigError)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer at {tokenizer_dir} has no eos_token; documents need a separator "
                         "(set data.tokenizer to one with an EOS token, or builtin)")
    return tok


@dataclass(frozen=True)
class TokenizerInfo:
    """What training reads of a tokenizer: `len()` (vocabulary with added tokens), `eos_token_id`, `pad_token_id`
    (None without a padding token), each equal to that of `open_tokenizer` on the same directory."""
    vocab_size: int
    eos_token_id: int
    pad_token_id: Optional[int]

    def __len__(self) -> int:
        return self.vocab_size


# Tokenizer classes that add nothing to what tokenizer.json and the config files say.
_PLAIN_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _plain_info(tokenizer_dir: Path) -> Optional[TokenizerInfo]:
    """The `TokenizerInfo` read from the files, for a directory whose loading is plain: a tokenizer.json, a generic
    tokenizer class, special tokens given as strings that agree between tokenizer_config.json and
    special_tokens_map.json and are all special added tokens of tokenizer.json (so `from_pretrained` adds none).
    None for anything else (model-specific classes, added_tokens files, extra special tokens, ...)."""
    files = {name: tokenizer_dir / name for name in ("tokenizer.json", "tokenizer_config.json")}
    if not all(p.is_file() for p in files.values()) or (tokenizer_dir / "added_tokens.json").exists():
        return None
    config = json.loads(files["tokenizer_config.json"].read_text())
    special_map_file = tokenizer_dir / "special_tokens_map.json"
    special_map = json.loads(special_map_file.read_text()) if special_map_file.is_file() else {}
    if (config.get("tokenizer_class") not in _PLAIN_CLASSES or "auto_map" in config
            or "added_tokens_decoder" in config or set(special_map) - set(_SPECIAL_KEYS)
            or any(config.get(k) for k in ("extra_special_tokens", "additional_special_tokens"))):
        return None
    named = {k: config[k] for k in _SPECIAL_KEYS if config.get(k) is not None}
    if any(not isinstance(v, str) for v in named.values()) or any(named.get(k) != v for k, v in special_map.items()):
        return None
    tok = Tokenizer.from_file(str(files["tokenizer.json"]))
    added = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    if "eos_token" not in named or any(v not in added for v in named.values()):
        return None
    return TokenizerInfo(vocab_size=tok.get_vocab_size(with_added_tokens=True), eos_token_id=added[named["eos_token"]],
                         pad_token_id=added.get(named.get("pad_token")))


def tokenizer_info(tokenizer_dir: Path) -> TokenizerInfo:
    """Vocabulary size, EOS and padding ids of a tokenizer directory (as `open_tokenizer` gives them): read from
    the files for a plain tokenizer (the builtin one, most exported ones), through `open_tokenizer` otherwise.
    Fails like `open_tokenizer` does on a tokenizer without an EOS token, or one that asks for remote code."""
    from train.config.errors import ConfigError
    from train.hf.folders import refuse_remote_code

    refuse_remote_code(Path(tokenizer_dir), "tokenizer", error=ConfigError)
    info = _plain_info(Path(tokenizer_dir))
    if info is not None:
        return info
    tok = open_tokenizer(tokenizer_dir)
    return TokenizerInfo(vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def load_tokenizer(cfg: DataConfig, is_main: bool = True, barrier: Optional[Callable[[], None]] = None,
                   corpus: Optional[Corpus] = None) -> Tuple[PreTrainedTokenizerFast, Path]:
    """(tokenizer, its directory) for `cfg`. Distributed: every rank calls this with `is_main` true on one
    rank and the same `barrier`; the main rank builds the cache, the others wait at the barrier and then
    load it. Without a barrier every caller builds if needed (atomic, so still safe)."""
    if is_main or barrier is None:
        out = ensure_tokenizer(cfg, corpus)
        if barrier is not None:
            barrier()
    else:
        barrier()
        out = ensure_tokenizer(cfg, corpus)  # now only a lookup
    return open_tokenizer(out), out
