"""Publishing a directory atomically among concurrent builders (the data caches: blend indices, tokenizers).

Each builder writes into its own temporary sibling of the destination and renames it into place. A rename onto a
directory that already holds files fails, so the first builder wins; a loser whose rename failed checks that the
winner's directory is there (its `marker` file), keeps it and discards its own copy. No reader ever sees a
half-written directory, and no temporary directory outlives the call.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def publish_dir(final: Path, write: Callable[[Path], None], marker: str) -> Path:
    """Run `write(tmp)` on a new temporary sibling of `final`, then rename it to `final`. When the rename fails and
    `final/marker` is a file (another process published first), that copy is kept and ours removed; any other
    failure (of `write` or of the rename) is raised. Returns `final`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        write(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / marker).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
