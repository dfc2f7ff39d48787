"""Document sources: every source becomes a `datasets` dataset with one column, `text`.

- `stdlib`: the `.py` files of the running interpreter's standard library (offline default), whole files in
  sorted relative-path order, a prefix of at most `max_corpus_mb`.
- `hf`: `datasets.load_dataset(name, config_name, split=..., streaming=...)`.
- `files`: local text / json / jsonl / parquet files or globs (`data.paths`); a `.txt` file is one document.

Each corpus carries a `fingerprint` that changes when its content (stdlib) or its spec and file stamps (files,
hf) change; the tokenizer and packed-data caches are keyed on it. The train/validation split is by a hash of a
document's text, so it does not depend on order, shuffling or world size, and duplicates land on one side.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, List, Sequence, Tuple, Union

import numpy as np

from train.config.run import DataConfig

if TYPE_CHECKING:  # imported where documents are loaded: a run on token files never imports `datasets` (~1 s)
    import datasets

AnyDataset = Union["datasets.Dataset", "datasets.IterableDataset"]

# File extension -> `datasets` packaged builder.
_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json",
             ".parquet": "parquet"}


@dataclass
class Corpus:
    """`documents` has the single column `text`; it is an `IterableDataset` when `streaming`. They are built by
    `build` on first use: the stdlib corpus is fingerprinted from its files alone, so a run whose tokenizer and
    token shards are cached (every rank, every restart) never builds the dataset nor imports `datasets` (~1 s)."""
    fingerprint: str
    streaming: bool
    build: Callable[[], AnyDataset] = field(repr=False)

    @cached_property
    def documents(self) -> AnyDataset:
        return self.build()


def cache_root(cfg: DataConfig) -> Path:
    """`data.cache_dir`, resolving the `${oc.env:...}` default when the config was built in Python."""
    value = cfg.cache_dir
    if "${" in value:
        from omegaconf import OmegaConf
        value = OmegaConf.create({"v": value}).v
    return Path(os.path.expanduser(value))


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(max_mb: float) -> List[Tuple[str, int]]:
    """(relative posix path, size in bytes) of the stdlib `.py` files used: sorted by relative path,
    site-packages and caches excluded, the longest prefix whose total size is at most `max_mb` MB."""
    root = stdlib_root()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")]
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath) / name
                found.append((path.relative_to(root).as_posix(), path.stat().st_size))
    found.sort()
    budget, total, chosen = int(max_mb * 1e6), 0, []
    for rel, size in found:
        if total + size > budget:
            break
        chosen.append((rel, size))
        total += size
    return chosen


def _load_stdlib(cfg: DataConfig) -> Corpus:
    root, texts, digest = stdlib_root(), [], hashlib.sha256()
    digest.update(f"stdlib|{sys.version}|{cfg.max_corpus_mb}".encode())
    for rel, _ in stdlib_files(cfg.max_corpus_mb):
        raw = (root / rel).read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:  # a few test fixtures use other encodings on purpose
            continue
        if text.strip():
            texts.append(text)
            digest.update(rel.encode() + b"\0" + hashlib.sha256(raw).digest())
    if not texts:
        raise ValueError(f"data.source=stdlib: no .py files found under {root} within "
                         f"data.max_corpus_mb={cfg.max_corpus_mb}")

    def build() -> AnyDataset:
        import datasets

        docs = datasets.Dataset.from_dict({"text": texts})
        return docs.to_iterable_dataset(num_shards=min(64, len(texts))) if cfg.streaming else docs

    return Corpus(digest.hexdigest(), cfg.streaming, build)


def expand_paths(patterns: Sequence[str]) -> List[str]:
    """Files named by `data.paths` (files or globs, `~` expanded), in the given order, each glob sorted.
    Raises FileNotFoundError naming `data.paths` and the first pattern that matches nothing."""
    if not patterns:
        raise ValueError("data.source=files needs data.paths (a list of files or globs), got none")
    files: List[str] = []
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else (
            [pattern] if os.path.exists(pattern) else [])
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise FileNotFoundError(f"data.paths: {pattern!r} matches no file (data.paths={list(patterns)})")
        files.extend(os.path.abspath(m) for m in matches)
    return list(dict.fromkeys(files))


def _builder_for(path: str) -> str:
    name = path[:-3] if path.endswith(".gz") else path
    ext = os.path.splitext(name)[1].lower()
    if ext not in _BUILDERS:
        raise ValueError(f"data.paths: cannot read {path!r}: extension {ext!r} is not one of "
                         f"{sorted(_BUILDERS)} (optionally .gz)")
    return _BUILDERS[ext]


def _only_text(ds: AnyDataset, text_field: str, where: str) -> AnyDataset:
    columns = ds.column_names
    if columns is not None and text_field not in columns:
        raise KeyError(f"data.text_field={text_field!r} is not a column of {where} (columns: {columns})")
    if text_field != "text":
        if columns is not None and "text" in columns:
            ds = ds.remove_columns(["text"])
        ds = ds.rename_column(text_field, "text")
    if columns is not None:
        ds = ds.remove_columns([c for c in ds.column_names if c != "text"])
    else:  # streaming datasets with unknown columns: keep only text lazily
        ds = ds.select_columns(["text"])
    return ds


def _load_files(cfg: DataConfig) -> Corpus:
    import datasets

    files = expand_paths(cfg.paths)
    stamps = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    fingerprint = _sha({"source": "files", "files": stamps, "text_field": cfg.text_field})
    cache = str(cache_root(cfg) / "hf_datasets")
    parts = []
    # Consecutive files with the same builder are read together; order is preserved.
    groups: List[Tuple[str, List[str]]] = []
    for f in files:
        builder = _builder_for(f)
        if groups and groups[-1][0] == builder:
            groups[-1][1].append(f)
        else:
            groups.append((builder, [f]))
    for builder, group in groups:
        if all(_is_jsonl(f) for f in group):  # read here: one line naming file and row for a bad record
            parts.append(_load_jsonl(group, cfg, cache, [s for s in stamps if s[0] in group]))
            continue
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        ds = datasets.load_dataset(builder, data_files=group, split="train", streaming=cfg.streaming,
                                   cache_dir=None if cfg.streaming else cache, **kwargs)
        parts.append(_only_text(ds, "text" if builder == "text" else cfg.text_field, f"{group}"))
    docs = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return Corpus(fingerprint, cfg.streaming, lambda: docs)


def _is_jsonl(path: str) -> bool:
    return path.endswith((".jsonl", ".jsonl.gz"))


def jsonl_texts(files: List[str], text_field: str, stamps=None) -> Iterator[dict]:
    """{"text": ...} of every record of JSON-lines files, in order. Only `text_field` is read, so records may carry
    any other fields, differing from file to file or row to row. A malformed line, a record that is not an object,
    or one without a string `text_field` raises a `DataError` naming the file and the line. `stamps` (unused)
    keeps the files' sizes and times in `datasets`' cache key."""
    import gzip

    from train.data.sources import DataError

    for path in files:
        with (gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")) as f:
            for row, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as e:
                    raise DataError(f"{path}:{row}: not a JSON object ({e}); fix or drop that line") from None
                text = record.get(text_field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    what = "is not a JSON object" if not isinstance(record, dict) else (
                        f"has no field {text_field!r}" if text_field not in record else
                        f"has a {type(text).__name__} in {text_field!r}, not a string")
                    raise DataError(f"{path}:{row}: the record {what} (data.text_field={text_field}); fix or drop "
                                    f"that line, or set data.text_field")
                yield {"text": text}


def _load_jsonl(files: List[str], cfg: DataConfig, cache: str, stamps) -> AnyDataset:
    import datasets

    features = datasets.Features({"text": datasets.Value("string")})
    kwargs = {"files": files, "text_field": cfg.text_field, "stamps": stamps}
    if cfg.streaming:
        return datasets.IterableDataset.from_generator(jsonl_texts, features=features, gen_kwargs=kwargs)
    try:
        return datasets.Dataset.from_generator(jsonl_texts, features=features, gen_kwargs=kwargs, cache_dir=cache)
    except datasets.exceptions.DatasetGenerationError as e:  # our DataError, wrapped by the builder
        cause = e.__cause__ or e.__context__
        if cause is not None and type(cause).__name__ == "DataError":
            raise cause from None
        raise


def _load_hf(cfg: DataConfig) -> Corpus:
    import datasets

    if not cfg.name:
        raise ValueError("data.source=hf needs data.name (a Hugging Face dataset name)")
    ds = datasets.load_dataset(cfg.name, cfg.config_name, split=cfg.split, streaming=cfg.streaming)
    fingerprint = _sha({"source": "hf", "name": cfg.name, "config": cfg.config_name, "split": cfg.split,
                        "text_field": cfg.text_field})
    docs = _only_text(ds, cfg.text_field, f"dataset {cfg.name!r}")
    return Corpus(fingerprint, cfg.streaming, lambda: docs)


def load_corpus(cfg: DataConfig) -> Corpus:
    """The documents of `data.source` as a `text`-only dataset (streaming when `data.streaming`)."""
    loaders = {"stdlib": _load_stdlib, "files": _load_files, "hf": _load_hf}
    if cfg.source not in loaders:
        raise ValueError(f"data.source={cfg.source!r}: expected one of {sorted(loaders)}")
    return loaders[cfg.source](cfg)


def text_unit_hash(text: str) -> float:
    """A uniform number in [0, 1) determined by the text alone."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest(),
                          "little") / 2.0**64


def is_val_text(text: str, val_fraction: float) -> bool:
    """The split rule: a document is held out when its text hash falls below `val_fraction`."""
    return text_unit_hash(text) < val_fraction


def split_train_val(docs: datasets.Dataset, val_fraction: float) -> Tuple[datasets.Dataset, datasets.Dataset]:
    """(train, val) documents of a map-style corpus by `is_val_text`; when the rule picks no document but
    `val_fraction > 0`, the one with the smallest hash is held out so a small corpus still has a val set."""
    units = np.fromiter((text_unit_hash(t) for t in iter_texts(docs)), dtype=np.float64, count=len(docs))
    is_val = units < val_fraction
    if val_fraction > 0 and not is_val.any() and len(docs) > 1:
        is_val[int(np.argmin(units))] = True
    return docs.select(np.flatnonzero(~is_val)), docs.select(np.flatnonzero(is_val))


def iter_texts(docs: AnyDataset, batch_size: int = 1000) -> Iterator[str]:
    """Texts in dataset order, read a batch at a time."""
    for batch in docs.iter(batch_size=batch_size):
        yield from batch["text"]
