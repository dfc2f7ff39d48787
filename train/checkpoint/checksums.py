"""Per-file SHA-256 checksums of a checkpoint directory, written at save time and verified before loading.

`CHECKSUMS.json` maps each file's path (relative to the checkpoint directory) to its size and SHA-256. It is
written just before the COMPLETE marker, so a complete checkpoint always has one; checkpoints from before this
file existed have none and are not verified. A truncated file, a flipped byte or a missing file is then caught
before any of it is deserialised.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Optional

CHECKSUM_FILE = "CHECKSUMS.json"
_CHUNK = 8 * 2**20


def inside(root: Path, rel: str) -> bool:
    """Whether the relative path `rel` stays inside `root` as written (no absolute path, no `..`, no NUL), before
    any symlink is followed: what a name recorded in a checkpoint's own files may be."""
    if not isinstance(rel, str) or not rel or "\0" in rel:
        return False
    p = Path(rel)
    return not p.is_absolute() and ".." not in p.parts and not rel.startswith("~")


class ChecksumMismatch(RuntimeError):
    """A file of a checkpoint is missing or differs from what was saved; the message names it."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def checksum_entries(ckpt_dir, rel_paths: Iterable[str]) -> dict:
    """{relative path: {bytes, sha256}} of the given files of `ckpt_dir` (each rank hashes what it wrote)."""
    root = Path(ckpt_dir)
    return {rel: {"bytes": (root / rel).stat().st_size, "sha256": sha256_of(root / rel)} for rel in rel_paths}


def write_checksums(ckpt_dir, skip: Iterable[str] = (), known: Optional[dict] = None) -> Path:
    """Record size and SHA-256 of every file under `ckpt_dir` (except `skip` and the checksum file itself).
    `known`: entries already computed (by the ranks that wrote those files), not hashed again."""
    root = Path(ckpt_dir)
    skip = {CHECKSUM_FILE, *skip}
    entries = dict(known or {})
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel not in skip and rel not in entries:
            entries[rel] = {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
    out = root / CHECKSUM_FILE
    out.write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n")
    return out


def verify_checksums(ckpt_dir, only: Optional[Iterable[str]] = None) -> bool:
    """Check the recorded files (or just those in `only`) against `CHECKSUMS.json`; raise `ChecksumMismatch`
    naming the first bad one. Returns False when the checkpoint has no checksum file (nothing to verify)."""
    root = Path(ckpt_dir)
    index = root / CHECKSUM_FILE
    if not index.is_file():
        return False
    try:
        entries = json.loads(index.read_text())
    except (OSError, ValueError) as e:
        raise ChecksumMismatch(f"{index} is unreadable ({e})") from None
    if not isinstance(entries, dict):
        raise ChecksumMismatch(f"{index} is not a mapping of file names to sizes and hashes (altered)")
    for rel in entries:  # every name first: a planted entry must not be read even when `only` skips it
        if not inside(root, rel):
            raise ChecksumMismatch(f"{index} names {rel!r}, a path outside the checkpoint: refused (altered; "
                                   f"nothing outside {root} is read)")
    names = entries if only is None else [n for n in only if n in entries]
    for rel in names:
        expected, path = entries[rel], root / rel
        if not path.is_file():
            raise ChecksumMismatch(f"{path} is missing")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise ChecksumMismatch(f"{path} has {size} bytes, {expected['bytes']} were saved (truncated?)")
        if sha256_of(path) != expected["sha256"]:
            raise ChecksumMismatch(f"{path} does not match the SHA-256 recorded at save time (corrupted)")
    return True
