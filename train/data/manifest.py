"""The JSON manifest written beside each Megatron pair by `python -m train.pretokenize`: `PREFIX.manifest.json`.

    {"format": "moeforge-tokens", "version": 1,
     "files": {"bin": {"name", "bytes", "sha256"}, "idx": {...}},   # names relative to the manifest's directory
     "dtype": "uint16" | "int32", "num_docs", "num_tokens", "max_token_id", "vocab_size", "eod_id",
     "tokenizer": {"fingerprint", "dir": "tokenizer" (relative to the manifest's directory), "files": [names]},
     "source": {the data config spec: source, paths/name/split/text_field/streaming/max_corpus_mb, fingerprint},
     "docs": [first, stop),        # the range of source documents this pair covers (empty ones included)
     "shard": {"index", "last", "shard_tokens"}}

It is written last, after the pair is in place, and atomically, so a pair whose manifest matches its files'
sizes (and, checked in full, their SHA-256) is complete.
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
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


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


def verify_manifest(prefix: PathLike, manifest: Dict[str, Any], full_hash: bool = False) -> None:
    """Check that the pair at `prefix` is the one `manifest` describes: the sizes always, the SHA-256 of each file
    when `full_hash`. Raises `TokenFileError` naming the file that differs."""
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
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise TokenFileError(f"{path}: changed after it was written ({size} bytes, the manifest says "
                                 f"{expected['bytes']}): {_RERUN}")
        if full_hash and sha256_file(path) != expected["sha256"]:
            raise TokenFileError(f"{path}: changed after it was written (SHA-256 differs from the manifest's): "
                                 f"{_RERUN}")
