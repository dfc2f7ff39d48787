"""From `data.*` to checked token sources: names, files, tokenizer, weights, and the checks on the files.

`data=tokens`: each `data.paths` entry (a prefix, a directory or a glob) is one source. Other sources (stdlib,
files, hf) are tokenized into shards first (`train.data.pretokenize.ensure_tokenized`) and become one source named
after `data.source`. Every problem found here is one line naming the file and the fix, raised before the model is
built (`ConfigError` from the config's view, `TokenFileError` from a file's).
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from train.config.run import DataConfig, TrainConfig, TrainerConfig
from train.data.corpus import cache_root
from train.data.indexed import TokenFileError, expand_token_paths, open_token_file
from train.data.manifest import read_manifest, verify_manifest
from train.data.token_source import TokenSource
from train.data.tokenizer import tokenizer_fingerprint

SCAN_TOKENS = 1 << 26  # tokens per chunk when a file without manifest is scanned for its largest id


class DataError(ValueError):
    """A data setting that cannot work; one line naming the field or file and the fix."""


def source_name(spec: str) -> str:
    """A prefix or file → its file name (`.npy` dropped); a directory → its name; a glob → its pattern's
    basename without wildcard characters."""
    text = os.path.expanduser(str(spec)).rstrip("/")
    base = os.path.basename(text)
    if glob.has_magic(text):
        return "".join(c for c in base if c not in "*?[]").strip("._-") or os.path.basename(os.path.dirname(text))
    return base[:-4] if base.endswith(".npy") else base


def _other_source_name(data: DataConfig) -> str:
    if data.source == "hf":
        return str(data.name).replace("/", "_")
    return str(data.source)  # a plain str (the enum would not safe-load from a checkpoint)


def _manifest_tokenizer(specs: List[Tuple[str, List[Path]]]) -> Tuple[Optional[Path], Optional[str]]:
    """The tokenizer directory the manifests name and its fingerprint; an error when two manifests disagree."""
    found: Optional[Tuple[Path, str, Path]] = None
    for _, paths in specs:
        for p in paths:
            m = read_manifest(p)
            if not m or "tokenizer" not in m:
                continue
            where = Path(f"{p}.manifest.json")
            fp = m["tokenizer"].get("fingerprint")
            tdir = where.parent / m["tokenizer"].get("dir", "tokenizer")
            if found is None:
                found = (tdir, fp, where)
            elif fp != found[1]:
                raise DataError(f"{where}: tokenizer {str(fp)[:12]} differs from {found[2]}'s {str(found[1])[:12]}: "
                                "mix only corpora tokenized with one tokenizer (re-tokenize one of them)")
    return (found[0], found[1]) if found else (None, None)


def source_specs(data: DataConfig) -> Tuple[List[Tuple[str, List[Path]]], Path]:
    """[(source name, its token files in order)] and the tokenizer directory. Non-token sources are tokenized
    here (cached: the main rank writes the shards, the others only find them)."""
    if data.source != "tokens":
        from train.data.pretokenize import ensure_tokenized
        prefixes, tokenizer_dir = ensure_tokenized(data)
        return [(_other_source_name(data), [Path(p) for p in prefixes])], Path(tokenizer_dir)
    specs = []
    for spec in data.paths:
        files = expand_token_paths(spec)
        for f in files:
            if not str(f).endswith(".npy") and not Path(f"{f}.idx").is_file():
                raise TokenFileError(f"{f}.idx: no such file (data.paths entry {spec!r}); give the prefix of a "
                                     "PREFIX.bin/.idx pair, a directory or a glob of them")
        specs.append((source_name(spec), files))
    names = [n for n, _ in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"data.paths={list(data.paths)}: two sources are named {dup[0]} (a source is named after "
                        "its file or directory name): rename or move one of them")
    manifest_dir, manifest_fp = _manifest_tokenizer(specs)
    if data.tokenizer:
        from train.data.tokenizer import ensure_tokenizer
        tokenizer_dir = ensure_tokenizer(data)
        if manifest_fp is not None and tokenizer_fingerprint(tokenizer_dir) != manifest_fp:
            where = next(Path(f"{p}.manifest.json") for _, ps in specs for p in ps if read_manifest(p))
            raise DataError(f"{where}: tokenized with another tokenizer than data.tokenizer={data.tokenizer}; "
                            "set data.tokenizer=null to use the corpus's own, or re-tokenize the corpus")
        return specs, tokenizer_dir
    if manifest_dir is None:
        first = specs[0][1][0] if specs and specs[0][1] else data.paths
        raise DataError(f"{first}: no manifest names a tokenizer (data.tokenizer=null): set data.tokenizer to the "
                        "tokenizer the files were written with (a directory or a Hugging Face name)")
    if not (manifest_dir / "tokenizer.json").is_file() and not (manifest_dir / "tokenizer_config.json").is_file():
        raise DataError(f"{manifest_dir}: the tokenizer the manifests name is missing; copy it back or set "
                        "data.tokenizer")
    return specs, manifest_dir


def _max_token_id(tf, cache_dir: Path) -> int:
    """The largest token id of a file: from its manifest, else a chunked scan cached by the file's stamp."""
    m = read_manifest(tf.prefix) if tf.kind == "megatron" else None
    if m is not None and "max_token_id" in m:
        return int(m["max_token_id"])
    path = tf.files()[0]
    st = os.stat(path)
    key = hashlib.sha256(f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = cache_dir / "max_token_id" / f"{key}.json"
    if cached.is_file():
        return int(json.loads(cached.read_text())["max_token_id"])
    top = -1
    with open(path, "rb") as f:  # read, not mapped: the scan leaves no pages in this process's resident set
        for a in range(0, tf.num_tokens, SCAN_TOKENS):
            chunk = np.fromfile(f, dtype=tf.dtype, count=min(SCAN_TOKENS, tf.num_tokens - a))
            top = max(top, int(chunk.max()))
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"file": str(path), "max_token_id": top}))
    os.replace(tmp, cached)
    return top


def open_sources(specs: List[Tuple[str, List[Path]]], cfg: TrainConfig, tokenizer, tokenizer_dir: Path
                 ) -> List[TokenSource]:
    """Open and check every file; one `TokenSource` per spec."""
    data, trainer = cfg.data, cfg.trainer
    vocab = cfg.model.vocab_size
    sources = []
    for name, paths in specs:
        files = []
        for p in paths:
            if not str(p).endswith(".npy"):
                m = read_manifest(p)
                if m is not None:
                    verify_manifest(p, m, full_hash=data.verify_tokens, verified_dir=cache_root(data) / "verified")
            tf = open_token_file(p, eos_id=tokenizer.eos_token_id, dtype=data.token_dtype,
                                 vocab_size=len(tokenizer))
            if tf.num_tokens:
                top = _max_token_id(tf, cache_root(data))
                if top >= vocab:
                    raise TokenFileError(f"{tf.files()[0]}: token id {top} >= model.vocab_size={vocab}: the file "
                                         f"was written with a larger vocabulary; raise model.vocab_size to at least "
                                         f"{top + 1} or re-tokenize with the run's tokenizer")
            files.append(tf)
        src = TokenSource(name, files, trainer.seq_len, data.val_fraction)
        if src.num_train_windows == 0:
            raise TokenFileError(f"{paths[0] if paths else name}: source {name} has {src.num_tokens} tokens, "
                                 f"{src.cut} before its held-out part: not one window of trainer.seq_len+1="
                                 f"{trainer.seq_len + 1} tokens; drop it from data.paths or add data")
        sources.append(src)
    return sources


def resolve_weights(data: DataConfig, num_windows: Sequence[int]) -> List[float]:
    """Normalised `data.weights`; when null, each source weighs by its training windows, so the mixture reads
    every source once per epoch as their concatenation would (Megatron weighs an unweighted blend the same way)."""
    if data.source != "tokens" or not data.weights:
        total = float(sum(num_windows))
        return [n / total for n in num_windows]
    w = np.asarray(data.weights, dtype=np.float64)
    return (w / w.sum()).tolist()


def file_stamps(files: Sequence[Sequence[Path]]) -> Dict[str, list]:
    """{path: [size, mtime_ns]} of every file the sources read."""
    out = {}
    for fs in files:
        for p in fs:
            st = os.stat(p)
            out[str(Path(p).resolve())] = [st.st_size, st.st_mtime_ns]
    return out


def data_key(files: Sequence[Sequence[Path]], weights: Sequence[float], trainer: TrainerConfig,
             val_fraction: float) -> str:
    """The data's identity for a resume: files (stamps), weights, split; not max_steps (raising it continues)."""
    spec = {"files": [[(str(Path(p).resolve()), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in fs]
                      for fs in files], "weights": [float(w) for w in weights], "val_fraction": val_fraction}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def check_sources(data: DataConfig) -> List[dict]:
    """Check that the data sources a run would read exist, without reading or tokenizing any data (the dry run):
    token files expand, every Megatron index header validates against its .bin size, manifests agree on one
    tokenizer and the tokenizer they name is there; text files match their globs; the stdlib is there. Returns
    [{"source": name, "files": count}]; raises a `TokenFileError` / `DataError` naming the file and the fix."""
    if data.source == "tokens":
        from train.data.indexed import IndexedTokens

        specs = []
        for spec in data.paths:
            files = expand_token_paths(spec)
            for f in files:
                if not str(f).endswith(".npy"):
                    IndexedTokens(f)  # the header and the sizes only: the tokens stay on disk
            specs.append((source_name(spec), files))
        manifest_dir, _ = _manifest_tokenizer(specs)
        if not data.tokenizer:
            if manifest_dir is None:
                raise DataError(f"{data.paths[0]}: no manifest names a tokenizer (data.tokenizer=null): set "
                                "data.tokenizer to the tokenizer the files were written with")
            if not (manifest_dir / "tokenizer.json").is_file() and not (manifest_dir / "tokenizer_config.json").is_file():
                raise DataError(f"{manifest_dir}: the tokenizer the manifests name is missing; copy it back or set "
                                "data.tokenizer")
        return [{"source": name, "files": len(files)} for name, files in specs]
    if data.source == "files":
        files = [p for pattern in data.paths for p in glob.glob(os.path.expanduser(pattern))]
        if not files:
            raise DataError(f"data.paths={list(data.paths)}: nothing matches: fix the path(s) or the glob(s)")
        return [{"source": _other_source_name(data), "files": len(files)}]
    if data.source == "stdlib":
        from train.data.corpus import stdlib_root

        if not stdlib_root().is_dir():
            raise DataError(f"data.source=stdlib: this interpreter's standard library ({stdlib_root()}) is missing: "
                            "use data=files or data=tokens")
        return [{"source": _other_source_name(data), "files": None}]
    if not data.name:  # hf: a hub name is only resolved when the data is read
        raise DataError("data.source=hf needs a dataset: data.name=<hub dataset name or local dataset folder>")
    return [{"source": _other_source_name(data), "files": None}]
