"""Reading what a run left on disk: its step records, its status and its config. `scripts/plot_run.py` and
`scripts/sweep_report.py` share it.

A run dir holds (see INTERFACE.md) `metrics.jsonl`, `config.yaml`, `checkpoints/` and `status.json`, which
`python -m train` writes on rank 0: `{"state": "running", "pid", "host", "started"}` when the job starts,
`"finished"` when `fit()` returns at `trainer.max_steps`, `"stopped"` when it returns earlier (SIGTERM: a
checkpoint to resume from) and `"failed"` with the `error` when it raises. A process killed outright
(SIGKILL, out of memory, a node lost) cannot write `failed`; `run_state` reports such a run as failed when its
recorded pid is gone from this host, and as running otherwise (another host's process cannot be checked).
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

STATUS_FILE = "status.json"
RUNNING, FINISHED, STOPPED, FAILED = "running", "finished", "stopped", "failed"


def read_records(run_dir: Path) -> list[dict]:
    """Step records in step order, one per step (the last written wins, so a resumed run's repeated steps
    count once); event lines (bad_step, spike) are not steps. No metrics file: an empty list."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    by_step: dict[int, dict] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a killed process
                continue
            if "step" in r and "event" not in r:
                by_step[int(r["step"])] = r
    return [by_step[s] for s in sorted(by_step)]


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that carry a numeric `key`."""
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def write_status(run_dir: Path, state: str, error: Optional[str] = None) -> bool:
    """Record the run's state in RUN_DIR/status.json (atomically: a reader never sees half a file). On a full disk
    (the failure being recorded may be that very disk) the old file is overwritten in place instead, which needs no
    new block; when even that fails, one line goes to stderr and False is returned: recording a failure must not
    raise another one over it."""
    run_dir = Path(run_dir)
    status = {"state": state, "pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
    if error is not None:
        status["error"] = error
    text = json.dumps(status) + "\n"
    tmp = run_dir / f".{STATUS_FILE}.tmp{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, run_dir / STATUS_FILE)
        return True
    except OSError as first:
        tmp.unlink(missing_ok=True)
        try:
            with open(run_dir / STATUS_FILE, "r+" if (run_dir / STATUS_FILE).is_file() else "w") as f:
                f.write(text)
                f.truncate()
            return True
        except OSError:
            print(f"moeforge: could not record state {state!r} in {run_dir / STATUS_FILE} ({first})", file=sys.stderr)
            return False


def run_dir_problem(run_dir) -> Optional[str]:
    """Why `run_dir` cannot be created or written (a read-only file system, no permission, a file in the way), or
    None. Checked before Hydra creates the directory and opens its log file there, which would otherwise end in a
    logging traceback."""
    path = Path(os.path.expanduser(str(run_dir))).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    if os.access(existing, os.W_OK | os.X_OK):
        return None
    try:
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    return f"{existing} is on a read-only file system" if read_only else f"{existing} is not writable by this user"


def read_status(run_dir: Path) -> Optional[dict]:
    path = Path(run_dir) / STATUS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def run_state(run_dir: Path, max_steps: Optional[int] = None) -> tuple[str, Optional[str]]:
    """(state, reason) of a run: `finished`, `stopped`, `failed` or `running`, from status.json; a run without
    one (older runs) is finished when its last step reached `max_steps`, else running."""
    status = read_status(run_dir)
    if status is None:
        records = read_records(run_dir)
        if max_steps is not None and records and records[-1]["step"] >= max_steps:
            return FINISHED, None
        return RUNNING, "no status.json"
    state = status.get("state")
    if state == RUNNING and status.get("host") == socket.gethostname() and not _pid_alive(int(status["pid"])):
        return FAILED, f"process {status['pid']} died without recording an error"
    return state, status.get("error")
