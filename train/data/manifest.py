"""The JSON manifest written beside each Megatron pair by `python -m train.pretokenize`: `PREFIX.manifest.json`.

    {"format": "moeforge-tokens", "version": 1,
     "files": {"bin": {"name", "bytes", "sha256"}, "idx": {...}},   # names relative to the manifest's directory
     "dtype": "uint16" | "int32", "num_docs", "num_tokens", "max_token_id", "vocab_size", "eod_id",
     "tokenizer": {"fingerprint", "dir": "tokenizer" (relative to the manifest's directory), "files": [names]},
     "source": {the data config spec: source, paths/name/split/text_field/streaming/max_corpus_mb, fingerprint},
     "docs": [first, stop),        # the range of source documents this pair covers (empty ones included)
     "shard": {"index", "last", "shard_tokens"}}

It is written last, after the pair is in place, and atomically, so a pair whose manifest matches its files'
sizes (and, checked in full, their SHA-256) is complete. Each file's entry also records its modification time
(`mtime_ns`): a file rewritten with the same size after its manifest was written is caught at the next start by
its SHA-256, which is computed only for files whose time changed (`verify_manifest`).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Optional

from train.data.indexed import PathLike, TokenFileError, bin_path, idx_path

FORMAT = "moeforge-tokens"
VERSION = 1
_RERUN = "re-run python -m train.pretokenize"


def manifest_path(prefix: PathLike) -> Path:
    """`PREFIX.manifest.json`."""
    return Path(f"{prefix}.manifest.json")


def sha256_file(path: PathLike, block: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def _entry(path: Path) -> Dict[str, Any]:
    st = path.stat()
    return {"name": path.name, "bytes": st.st_size, "sha256": sha256_file(path), "mtime_ns": st.st_mtime_ns}


def write_manifest(prefix: PathLike, **fields: Any) -> Path:
    """Write `PREFIX.manifest.json` for the finished pair at `prefix`: `format`, `version` and `files` (name, size,
    SHA-256 of the `.bin` and `.idx`) are computed here, `fields` give the rest. Atomic (a temporary file renamed
    into place). Returns the manifest's path."""
    manifest = {"format": FORMAT, "version": VERSION,
                "files": {"bin": _entry(bin_path(prefix)), "idx": _entry(idx_path(prefix))}, **fields}
    path = manifest_path(prefix)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(prefix: PathLike) -> Optional[Dict[str, Any]]:
    """The manifest of `prefix`, or None when there is none or it is not a readable moeforge manifest."""
    try:
        manifest = json.loads(manifest_path(prefix).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None
    return manifest


def verify_manifest(prefix: PathLike, manifest: Dict[str, Any], full_hash: bool = False,
                    verified_dir: Optional[Path] = None) -> None:
    """Check that the pair at `prefix` is the one `manifest` describes. Always the sizes (free); the SHA-256 of a
    file whose modification time differs from the one recorded (a rewrite of the same size, or only a copy), once:
    a match is remembered in `verified_dir` under the file's new stamp, so a copied corpus is hashed on its first
    start only; every file's SHA-256 when `full_hash` (data.verify_tokens: a full read of the corpus). Raises
    `TokenFileError` naming the file that differs."""
    where = manifest_path(prefix)
    if manifest.get("version") != VERSION:
        raise TokenFileError(f"{where}: manifest version {manifest.get('version')!r}, this code reads version "
                             f"{VERSION}; {_RERUN}")
    for kind, path in (("bin", bin_path(prefix)), ("idx", idx_path(prefix))):
        expected = manifest.get("files", {}).get(kind)
        if not expected:
            raise TokenFileError(f"{where}: lists no .{kind} file; {_RERUN}")
        if not path.is_file():
            raise TokenFileError(f"{path}: missing (its manifest {where.name} lists it); {_RERUN}")
        st = path.stat()
        if st.st_size != expected["bytes"]:
            raise TokenFileError(f"{path}: changed after it was written ({st.st_size} bytes, the manifest says "
                                 f"{expected['bytes']}): {_RERUN}")
        touched = expected.get("mtime_ns") not in (None, st.st_mtime_ns)  # manifests before the stamp: sizes only
        stamp = _stamp_file(verified_dir, path, st, expected["sha256"]) if verified_dir is not None else None
        if not (full_hash or (touched and not (stamp is not None and stamp.is_file()))):
            continue
        if sha256_file(path) != expected["sha256"]:
            raise TokenFileError(f"{path}: changed after it was written (SHA-256 differs from the manifest's"
                                 f"{', modified since' if touched else ''}): {_RERUN}")
        if touched and stamp is not None:
            stamp.parent.mkdir(parents=True, exist_ok=True)
            tmp = stamp.with_name(f"{stamp.name}.tmp{os.getpid()}")
            tmp.write_text(json.dumps({"file": str(path), "sha256": expected["sha256"]}) + "\n")
            os.replace(tmp, stamp)


def _stamp_file(verified_dir: Path, path: Path, st: os.stat_result, sha256: str) -> Path:
    """Where a file's match with its manifest is remembered: keyed by its path, size, mtime and expected hash."""
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{sha256}"
    return Path(verified_dir) / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"
