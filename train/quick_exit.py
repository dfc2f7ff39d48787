"""`skip_final_collection()`: a command-line entry point calls it first, so its process ends without CPython's
exit-time garbage collections.

At exit CPython collects garbage several times while it tears the modules down, and each collection walks every
tracked object still alive: after torch, sympy, DeepSpeed or transformers are imported, about a second of CPU per
process, paid by every rank of a job and by every CLI a test starts. `gc.freeze()`, registered when the command
starts (exit handlers run last-registered first: after those the run registers, before those its imports did),
moves every object to the permanent generation, which those collections skip. Nothing is lost: reference counting
still frees what the teardown releases, the other handlers (logging's flush among them) still run, and objects
left in cycles go with the process, which Python allows at exit (their finalizers are not guaranteed to run)."""
from __future__ import annotations

import atexit
import gc


def skip_final_collection() -> None:
    """Register `gc.freeze` to run at exit, after the handlers registered later and before the earlier ones."""
    atexit.register(gc.freeze)
