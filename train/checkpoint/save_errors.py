"""Saves that fail part-way (a full disk, a file-size limit, an I/O error): one line naming the file and the
reason, the same outcome on every rank, and nothing left behind that looks complete.

A save is a few phases, each a set of writes on some ranks (`SaveAttempt.write`), then an agreement
(`SaveAttempt.agree`, one all-gather): after it every rank holds the first failure of any rank, so no rank goes on
to a collective the others skip, and no rank reports a save that another rank failed. DCP's own save is
collective and already raises on every rank when one rank fails (`CheckpointException`).
"""
from __future__ import annotations

import errno
import os
import resource
import shutil
from pathlib import Path
from typing import Callable, Optional, TypeVar

from torch.distributed.checkpoint.api import CheckpointException

import parallel
from train.checkpoint.layout import CheckpointError

T = TypeVar("T")

# What a failed write raises: OSError (ENOSPC, EFBIG, EIO, EACCES; shutil.Error is one), RuntimeError (torch.save's
# C++ writer: "file write failed"), CheckpointException (DCP, a BaseException, wrapping each rank's error).
WRITE_ERRORS = (OSError, RuntimeError, CheckpointException)


class SaveError(CheckpointError):
    """A checkpoint save failed on some rank; raised on every rank with the same one-line message.
    `previous`: the newest complete checkpoint at the time (None when there is none), the one a resume uses."""

    def __init__(self, message: str, previous: Optional[Path] = None):
        super().__init__(message)
        self.previous = previous


def reason(e: BaseException) -> str:
    """One line: why a write failed (errno name and text for an OSError, the first line otherwise)."""
    if isinstance(e, CheckpointException):
        failures = getattr(e, "failures", None) or {}
        inner = [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        return reason(inner[0]) if inner else str(e).splitlines()[0]
    if isinstance(e, shutil.Error) and e.args and isinstance(e.args[0], list) and e.args[0]:
        return str(e.args[0][0][2])  # (src, dst, why) of the first file copytree could not copy
    if isinstance(e, OSError) and e.errno:
        text = f"[{errno.errorcode.get(e.errno, e.errno)}] {os.strerror(e.errno)}"
        return f"{e.filename}: {text}" if e.filename else text
    lines = str(e).strip().splitlines()
    if isinstance(e, RuntimeError) and ("inline_container" in str(e) or "PytorchStreamWriter" in str(e)):
        return "torch's file writer stopped part-way (it reports no errno: a full disk, a quota or a file-size limit)"
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def _limits(path: Path) -> str:
    """The free space under `path` and this process's file-size limit, when it has one: what a reader needs to
    tell a full disk from a quota or `ulimit -f` (torch's own writer loses the errno)."""
    free = "free space unknown"
    for p in (path, *path.parents):
        try:
            free = f"{shutil.disk_usage(p).free / 2**30:.2f} GiB free on its file system"
            break
        except OSError:
            continue
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return free if soft == resource.RLIM_INFINITY else f"{free}; file-size limit (ulimit -f) {soft} bytes"


class SaveAttempt:
    """The first write failure of this rank, and, after `agree`, of every rank."""

    def __init__(self, mesh):
        self.mesh = mesh
        self.error: Optional[str] = None  # "" once DCP reported another rank's failure to this one

    def write(self, what: Path, fn: Callable[..., T], *args, **kwargs) -> Optional[T]:
        """`fn(*args, **kwargs)`, which writes `what`; a failure is recorded (naming `what`), not raised. Skipped
        once this attempt has failed. For DCP's collective save `what` is the state/ directory, and the message
        names the file of the rank that failed."""
        if self.error is not None:
            return None
        try:
            return fn(*args, **kwargs)
        except WRITE_ERRORS as e:
            label = str(what)
            if isinstance(e, CheckpointException) and getattr(e, "failures", None):
                if self.mesh.rank not in e.failures:  # DCP raises on every rank; the failing rank describes it
                    self.error = ""
                    return None
                label = str(Path(what) / f"__{self.mesh.rank}_0.distcp")
            self.error = f"writing {label} failed: {reason(e)} ({_limits(Path(what))})"
            return None

    def agree(self) -> Optional[str]:
        """Collective: every rank returns the first failure of the lowest failing rank (None: all went well)."""
        errors = parallel.gather_objects(self.error, self.mesh)
        failed = [(r, e) for r, e in enumerate(errors) if e]  # "": this rank saw another rank's failure
        if failed:
            r, e = failed[0]
            self.error = e if self.mesh.world_size == 1 else f"rank {r}: {e}"
        elif any(e is not None for e in errors):  # only DCP's word that some rank failed
            self.error = "writing the sharded state failed on another rank"
        return self.error
