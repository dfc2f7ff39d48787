"""Offline tokenization of a corpus into Megatron token files, with a manifest beside each pair (`manifest.py`).

Documents: those of the corpus `data=` names (`corpus.py`), in corpus order, unshuffled. Each is tokenized without
special tokens and followed by EOD (the tokenizer's `eos_token_id`); one document is one Megatron sequence. A
document with no tokens (an empty text) is skipped, but still counted in the `docs` ranges of the manifests.

Parallel and deterministic: the documents are cut into chunks of at most `CHUNK_DOCS` documents and `CHUNK_CHARS`
characters, whatever the worker count; `workers` forked processes tokenize whole chunks, each single-threaded (the
Rust tokenizer's own thread pool is switched off, so the worker count is the parallelism), and the parent writes
the results in chunk order. The bytes written do not depend on the worker count.

Shards: with `shard_tokens`, `PREFIX_00000`, `PREFIX_00001`, ..., a shard closed at the first document boundary
where it holds at least `shard_tokens` tokens; without, one pair `PREFIX`. Restart: a pair whose manifest matches
its files' sizes, the corpus and the tokenizer is kept; the documents of a missing or incomplete shard are read
from its neighbours' `docs` ranges and tokenized again, and only that shard is rewritten.

The cache (`ensure_tokenized`, used by training): the same code writes `cache_dir/tokens/<key>/<source>_NNNNN`,
key = corpus fingerprint + tokenizer fingerprint + `FORMAT_VERSION`, on first use; later calls reuse it. A
streamed source (`data.streaming=true`) is read as a stream, once, straight into token files (never stored as
Arrow); training then reads the token files. So streaming means "do not download or materialise the dataset",
not "train while reading": the first run tokenizes the whole stream before its first step.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
from tqdm import tqdm

from train.config.run import DataConfig
from train.data.corpus import AnyDataset, Corpus, cache_root, load_corpus
from train.data.indexed import IndexedWriter, TokenFileError, dtype_for_vocab
from train.data.manifest import manifest_path, read_manifest, verify_manifest, write_manifest
from train.data.tokenizer import ensure_tokenizer, open_tokenizer, tokenizer_fingerprint, tokenizer_info

CHUNK_DOCS = 1024  # a chunk (the unit of work of one worker) ends at this many documents ...
CHUNK_CHARS = 1 << 19  # ... or once it holds this many characters of text
FORMAT_VERSION = 1  # bump when what is written changes, to invalidate token caches
CACHE_SHARD_TOKENS = 1 << 28  # shard size of the training cache (512 MiB of uint16 tokens)
_SINGLE_THREAD_ENV = {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"}
# Chunks tokenized by this process or its workers (tests: a rerun that reuses everything adds none).
TOKENIZED_CHUNKS = 0


class Encoder:
    """Tokenizes a list of texts into (flat tokens, per-document lengths with EOD, 0 for an empty text); the tokens'
    dtype is Megatron's for the vocabulary (`dtype_for_vocab`)."""

    def __init__(self, tokenizer_dir: Path):
        self.tokenizer_dir = Path(tokenizer_dir)
        info = tokenizer_info(self.tokenizer_dir)
        self.vocab_size = len(info)
        self.eod_id, self.dtype = int(info.eos_token_id), dtype_for_vocab(self.vocab_size)
        # Opened before the first text (`open`): a run whose shards are all cached never imports `transformers`.
        self.tokenizer = self.backend = None

    def open(self) -> "Encoder":
        """Load the tokenizer itself (once)."""
        if self.tokenizer is None:
            self.tokenizer = open_tokenizer(self.tokenizer_dir)
            # The Rust tokenizer directly: what `tokenizer(texts, add_special_tokens=False)` computes, without
            # offsets.
            self.backend = self.tokenizer.backend_tokenizer if getattr(self.tokenizer, "is_fast", False) else None
            if self.backend is not None:
                self.backend.no_truncation()
                self.backend.no_padding()
        return self

    def ids(self, texts: List[str]) -> List[List[int]]:
        self.open()
        if self.backend is not None:
            return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def __call__(self, texts: List[str]) -> Tuple[np.ndarray, np.ndarray]:
        ids = self.ids(texts)
        lengths = np.array([len(x) + 1 if x else 0 for x in ids], dtype=np.int64)
        parts = [np.array(x + [self.eod_id], dtype=np.int64) for x in ids if x]
        flat = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        if flat.size and int(flat.max()) > np.iinfo(self.dtype).max:
            raise TokenFileError(f"token id {int(flat.max())} does not fit {self.dtype} (vocabulary size below "
                                 "the largest id?)")
        return flat.astype(self.dtype), lengths


_WORKER_ENCODER: Optional[Encoder] = None


def _init_worker(tokenizer_dir: Path) -> None:
    global _WORKER_ENCODER
    os.environ.update(_SINGLE_THREAD_ENV)
    if _WORKER_ENCODER is None:  # a forked worker inherits the parent's
        _WORKER_ENCODER = Encoder(tokenizer_dir)


def _encode_in_worker(texts: List[str]) -> Tuple[np.ndarray, np.ndarray]:
    return _WORKER_ENCODER(texts)


@contextlib.contextmanager
def _single_threaded_tokenizers():
    """Switch the Rust tokenizer's thread pool off in this process (and the workers it forks), then restore."""
    saved = {k: os.environ.get(k) for k in _SINGLE_THREAD_ENV}
    os.environ.update(_SINGLE_THREAD_ENV)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _chunks(docs: AnyDataset, start: int, stop: Optional[int]) -> Iterator[Tuple[int, List[str]]]:
    """(index of its first document, texts) of each chunk of documents [start, stop) (stop None: to the end)."""
    import datasets  # here, not at the top: a run whose shards are all cached never imports it (~1 s per rank)

    if isinstance(docs, datasets.Dataset):
        stop = len(docs) if stop is None else min(stop, len(docs))
        batches = ((a, docs[a:min(a + CHUNK_DOCS, stop)]["text"]) for a in range(start, stop, CHUNK_DOCS))
    else:  # a stream: read in order, the documents before `start` read and dropped
        stream = docs.skip(start) if start else docs
        stream = stream.take(stop - start) if stop is not None else stream
        batches = _numbered(stream.iter(batch_size=CHUNK_DOCS), start)
    for first, texts in batches:
        i = 0
        while i < len(texts):
            j, size = i, 0
            while j < len(texts) and (j == i or size + len(texts[j]) <= CHUNK_CHARS):
                size += len(texts[j])
                j += 1
            yield first + i, texts[i:j]
            i = j


def _numbered(batches, start: int):
    for batch in batches:
        yield start, batch["text"]
        start += len(batch["text"])


def _encoded(encoder: Encoder, chunks, workers: int):
    """(first document, number of documents, (flat tokens, lengths)) of each chunk, in chunk order; at most
    2 x workers chunks are in flight, so memory stays bounded on any corpus."""
    global TOKENIZED_CHUNKS, _WORKER_ENCODER
    if workers <= 1:
        for first, texts in chunks:
            TOKENIZED_CHUNKS += 1
            yield first, len(texts), encoder(texts)
        return
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    _WORKER_ENCODER = encoder.open()  # inherited by forked workers: no tokenizer load per worker
    try:
        with ctx.Pool(workers, initializer=_init_worker, initargs=(encoder.tokenizer_dir,)) as pool:
            pending: collections.deque = collections.deque()
            for first, texts in chunks:
                TOKENIZED_CHUNKS += 1
                pending.append((first, len(texts), pool.apply_async(_encode_in_worker, (texts,))))
                if len(pending) >= 2 * workers:
                    f, n, result = pending.popleft()
                    yield f, n, result.get()
            while pending:
                f, n, result = pending.popleft()
                yield f, n, result.get()
    finally:
        _WORKER_ENCODER = None


@dataclass
class _Job:
    """Tokenize source documents [start, stop) into shards first_shard, ... (stop None: to the end of the corpus,
    whose last shard is then the last one; else it must fill exactly `num_shards`, the gap between kept shards)."""
    first_shard: int
    start: int
    stop: Optional[int]
    num_shards: Optional[int]


def shard_prefix(out: Path, index: int, sharded: bool) -> Path:
    """`PREFIX_00007` (sharded) or `PREFIX`."""
    return Path(f"{out}_{index:05d}") if sharded else out


def _shard_indices(out: Path) -> List[int]:
    pattern = re.compile(re.escape(out.name) + r"_(\d{5})\.(bin|idx|manifest\.json)")
    found = {int(m.group(1)) for p in (out.parent.iterdir() if out.parent.is_dir() else ())
             if (m := pattern.fullmatch(p.name))}
    return sorted(found)


def _complete(prefix: Path, identity: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The manifest of `prefix` when the pair is complete and was made from the same corpus and tokenizer."""
    manifest = read_manifest(prefix)
    if manifest is None or any(_get(manifest, k) != v for k, v in identity.items()):
        return None
    try:
        verify_manifest(prefix, manifest, full_hash=False)
    except TokenFileError:
        return None
    return manifest


def _get(manifest: Dict[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        manifest = manifest.get(key, {}) if isinstance(manifest, dict) else {}
    return manifest


def _plan(out: Path, sharded: bool, identity: Dict[str, Any]) -> Tuple[Dict[int, Dict[str, Any]], List[_Job]]:
    """(kept shards' manifests by index, jobs that write the rest)."""
    if not sharded:
        manifest = _complete(out, identity)
        return ({0: manifest}, []) if manifest else ({}, [_Job(0, 0, None, None)])
    kept: Dict[int, Dict[str, Any]] = {}
    jobs: List[_Job] = []
    next_shard, next_doc = 0, 0
    for index in _shard_indices(out):
        manifest = _complete(shard_prefix(out, index, True), identity)
        if manifest is None:
            continue
        first, stop = manifest["docs"]
        if index > next_shard and first > next_doc:  # missing shards in between: their documents, again
            jobs.append(_Job(next_shard, next_doc, first, index - next_shard))
        elif (index, first) != (next_shard, next_doc):
            continue  # does not follow what precedes it: rewritten
        kept[index], next_shard, next_doc = manifest, index + 1, stop
        if manifest["shard"]["last"]:
            return kept, jobs
    jobs.append(_Job(next_shard, next_doc, None, None))
    return kept, jobs


class _ShardWriter:
    """Writes consecutive shards of one job: pair, then manifest (see the module docstring for where it cuts)."""

    def __init__(self, out: Path, shard_tokens: Optional[int], dtype: np.dtype, fields: Dict[str, Any]):
        self.out, self.shard_tokens, self.dtype, self.fields = out, shard_tokens, dtype, fields
        self.manifests: Dict[int, Dict[str, Any]] = {}

    def begin(self, index: int, first_doc: int, limit: Optional[int] = None) -> None:
        """Start shard `index` at source document `first_doc`; `limit`: the first index it may not write (a kept
        shard), None for no limit."""
        if index == limit:
            raise ValueError(f"{self.out}: documents before shard {limit} no longer fit in the shards they filled; "
                             "the corpus changed since: delete the outputs and re-run")
        self.index, self.first_doc, self.num_docs, self.limit = index, first_doc, 0, limit
        self.prefix = shard_prefix(self.out, index, self.shard_tokens is not None)
        manifest_path(self.prefix).unlink(missing_ok=True)  # its files are about to change
        self.writer = IndexedWriter(self.prefix, self.dtype)

    def add(self, doc: int, tokens: np.ndarray) -> None:
        if self.shard_tokens is not None and self.writer.num_tokens >= self.shard_tokens:
            self.end(doc, last=False)
            self.begin(self.index + 1, doc, self.limit)
        self.writer.add_document(tokens)
        self.num_docs += 1

    def end(self, stop_doc: int, last: bool) -> None:
        self.writer.finalize()
        write_manifest(self.prefix, **self.fields, num_docs=self.num_docs, num_tokens=self.writer.num_tokens,
                       max_token_id=self.writer.max_token_id, docs=[self.first_doc, stop_doc],
                       shard={"index": self.index, "last": last, "shard_tokens": self.shard_tokens})
        self.manifests[self.index] = read_manifest(self.prefix)


def source_spec(cfg: DataConfig, fingerprint: str) -> Dict[str, Any]:
    """The data config fields that name the documents, and the corpus fingerprint."""
    spec: Dict[str, Any] = {"source": cfg.source, "text_field": cfg.text_field, "streaming": cfg.streaming,
                            "max_corpus_mb": cfg.max_corpus_mb}
    if cfg.source == "files":
        spec["paths"] = [str(p) for p in cfg.paths]
    elif cfg.source == "hf":
        spec.update(name=cfg.name, config_name=cfg.config_name, split=cfg.split)
    spec["fingerprint"] = fingerprint
    return spec


def install_tokenizer(src: Path, dest: Path) -> Path:
    """Copy the tokenizer directory `src` to `dest` (atomically); a `dest` holding the same tokenizer is kept."""
    fingerprint = tokenizer_fingerprint(src)
    if dest.exists():
        if tokenizer_fingerprint(dest) == fingerprint:
            return dest
        raise ValueError(f"--out: {dest} holds another tokenizer than data.tokenizer={src}; token files of "
                         "different tokenizers go in different directories")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    os.chmod(tmp, 0o755)  # mkdtemp's 0o700 would hide the tokenizer from other users of the token files
    try:
        for path in sorted(Path(src).iterdir()):
            if path.is_file():
                shutil.copy2(path, tmp / path.name)
        try:
            os.rename(tmp, dest)
        except OSError:  # another writer got there first
            if tokenizer_fingerprint(dest) != fingerprint:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def pretokenize(data_cfg: DataConfig, out: Path, workers: int = 1, shard_tokens: Optional[int] = None,
                progress: bool = True, corpus: Optional[Corpus] = None) -> Dict[str, Any]:
    """Tokenize the corpus of `data_cfg` into `out` (a pair, or shards when `shard_tokens`) with the tokenizer in
    `out`'s directory under `tokenizer/`; complete shards of an earlier run are kept. Returns the summary:
    num_docs, num_tokens (all outputs), tokens_per_s (of this run's writing), workers, outputs, ..."""
    if workers < 1:
        raise ValueError(f"--workers {workers}: must be at least 1")
    if shard_tokens is not None and shard_tokens < 1:
        raise ValueError(f"--shard-tokens {shard_tokens}: must be at least 1")
    out = Path(out).absolute()
    corpus = corpus or load_corpus(data_cfg)
    tokenizer_dir = install_tokenizer(ensure_tokenizer(data_cfg, corpus), out.parent / "tokenizer")
    start_time = time.perf_counter()
    with _single_threaded_tokenizers():
        encoder = Encoder(tokenizer_dir)
        vocab_size, dtype = encoder.vocab_size, encoder.dtype
        tok_fingerprint = tokenizer_fingerprint(tokenizer_dir)
        fields = {"dtype": dtype.name, "vocab_size": vocab_size, "eod_id": encoder.eod_id,
                  "tokenizer": {"fingerprint": tok_fingerprint, "dir": os.path.relpath(tokenizer_dir, out.parent),
                                "files": sorted(p.name for p in tokenizer_dir.iterdir() if p.is_file())},
                  "source": source_spec(data_cfg, corpus.fingerprint)}
        identity = {"source.fingerprint": corpus.fingerprint, "tokenizer.fingerprint": tok_fingerprint,
                    "shard.shard_tokens": shard_tokens, "dtype": dtype.name}
        kept, jobs = _plan(out, shard_tokens is not None, identity)
        written, new_docs, new_tokens = _run_jobs(corpus, jobs, encoder, out, shard_tokens, fields, workers, progress)
    manifests = {**kept, **written}
    count = max(manifests) + 1
    if sorted(manifests) != list(range(count)):
        raise RuntimeError(f"{out}: shards {sorted(set(range(count)) - set(manifests))} were not written")
    if shard_tokens is not None:
        _remove_stale_shards(out, count)
    seconds = time.perf_counter() - start_time
    num_docs = sum(m["num_docs"] for m in manifests.values())
    if num_docs == 0:
        raise ValueError(f"data.source={data_cfg.source}: the corpus has no non-empty documents")
    return {"num_docs": num_docs, "num_tokens": sum(m["num_tokens"] for m in manifests.values()),
            "tokens_per_s": round(new_tokens / seconds, 1), "docs_per_s": round(new_docs / seconds, 1),
            "workers": workers, "outputs": [str(shard_prefix(out, i, shard_tokens is not None)) for i in range(count)],
            "tokenizer_dir": str(tokenizer_dir), "dtype": dtype.name, "vocab_size": vocab_size,
            "written_shards": len(written), "kept_shards": len(kept), "tokenized_docs": new_docs,
            "tokenized_tokens": new_tokens, "seconds": round(seconds, 3)}


def _run_jobs(corpus: Corpus, jobs: List[_Job], encoder: Encoder, out: Path, shard_tokens: Optional[int],
              fields: Dict[str, Any], workers: int, progress: bool):
    """Run `jobs`; returns (manifests written by index, documents read, tokens written)."""
    if not jobs:  # every shard kept: the documents are never built
        return {}, 0, 0
    import datasets

    docs = corpus.documents
    total = None
    if isinstance(docs, datasets.Dataset):
        total = sum((len(docs) if j.stop is None else j.stop) - j.start for j in jobs)
    bar = tqdm(total=total, unit="doc", desc=f"tokenize {out.name}", file=sys.stderr, mininterval=1.0,
               disable=not progress or not jobs, dynamic_ncols=True)
    shards = _ShardWriter(out, shard_tokens, encoder.dtype, fields)
    num_docs = num_tokens = 0
    started = time.perf_counter()
    with bar:
        for job in jobs:
            shards.begin(job.first_shard, job.start,
                         None if job.num_shards is None else job.first_shard + job.num_shards)
            doc = job.start
            for first, n, (flat, lengths) in _encoded(encoder, _chunks(docs, job.start, job.stop), workers):
                ends = np.cumsum(lengths)
                for i in np.flatnonzero(lengths):
                    shards.add(first + int(i), flat[ends[i] - lengths[i]:ends[i]])
                doc = first + n
                num_docs, num_tokens = num_docs + n, num_tokens + int(flat.size)
                bar.update(n)
                bar.set_postfix_str(f"{num_tokens / max(time.perf_counter() - started, 1e-9):,.0f} tokens/s",
                                    refresh=False)
            if job.stop is not None and doc != job.stop:
                raise ValueError(f"{out}: the corpus ended at document {doc}, before {job.stop} where a kept shard "
                                 "starts; it changed since: delete the outputs and re-run")
            shards.end(doc, last=job.stop is None)
            if job.num_shards is not None and shards.index + 1 - job.first_shard != job.num_shards:
                raise ValueError(f"{out}: documents [{job.start}, {job.stop}) now make "
                                 f"{shards.index + 1 - job.first_shard} shards, not {job.num_shards}; the corpus "
                                 "changed since: delete the outputs and re-run")
    return shards.manifests, num_docs, num_tokens


def _remove_stale_shards(out: Path, count: int) -> None:
    """Shards of an earlier, longer output numbered `count` and above (so a directory glob does not pick them)."""
    for index in _shard_indices(out):
        if index >= count:
            prefix = shard_prefix(out, index, True)
            for path in (Path(f"{prefix}.bin"), Path(f"{prefix}.idx"), manifest_path(prefix)):
                path.unlink(missing_ok=True)


def cache_key(corpus_fingerprint: str, tokenizer_fp: str, streaming: bool) -> str:
    spec = {"v": FORMAT_VERSION, "corpus": corpus_fingerprint, "tokenizer": tokenizer_fp, "streaming": streaming}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def ensure_tokenized(data_cfg: DataConfig, workers: Optional[int] = None,
                     progress: bool = True) -> Tuple[List[Path], Path]:
    """(shard prefixes, tokenizer directory) of the corpus `data_cfg` names (stdlib, files or hf), tokenized into
    `cache_dir/tokens/<key>/<source>_NNNNN` by `pretokenize` on first use (`workers` default `data.num_proc`),
    reused as it is afterwards. Call it on one process per filesystem (the main rank); the others wait."""
    corpus = load_corpus(data_cfg)
    tokenizer_dir = ensure_tokenizer(data_cfg, corpus)
    out_dir = cache_root(data_cfg) / "tokens" / cache_key(corpus.fingerprint, tokenizer_fingerprint(tokenizer_dir),
                                                           corpus.streaming)
    summary = pretokenize(data_cfg, out_dir / data_cfg.source, workers or max(1, data_cfg.num_proc),
                          CACHE_SHARD_TOKENS, progress, corpus)
    return [Path(p) for p in summary["outputs"]], Path(summary["tokenizer_dir"])
