"""Per-device peak FLOP/s for MFU: `trainer.peak_flops` is null (the device table), a number, or `measure`.

MFU is reported against the dense bf16 tensor-core peak whatever the precision recipe (torchtitan's and
Megatron's convention), so runs in different precisions compare on one scale. A device not in the table (and
every CPU) falls back to a nominal 1 TFLOP/s: set `trainer.peak_flops` for a meaningful MFU there.

`measure` times a square matmul in the run's compute dtype instead (bf16 for bf16 and fp8, whose MFU keeps the
bf16 convention above; fp32 for fp32) and keeps the result in a small JSON cache keyed by device and dtype
(`$MOEFORGE_CACHE/peak_flops.json`, else `~/.cache/moeforge/peak_flops.json`), so only a device's first run
pays for it. Delete the entry (or the file) to measure again, e.g. after a driver or thread-count change that
the key does not capture.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import torch

from train.config.run import MEASURE  # noqa: F401 (defined with the schema that checks it)

# Dense bf16 peaks from the vendors' data sheets (SXM parts), FLOP/s.
_BF16_PEAK = (
    ("H200", 989.4e12),
    ("H100", 989.4e12),  # the PCIe part is lower (756e12): set trainer.peak_flops for it
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
)
NOMINAL_PEAK = 1.0e12
CACHE_FILE = "peak_flops.json"
# The dtype whose dense GEMM peak is MFU's denominator, per precision recipe.
COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16_autocast": torch.bfloat16, "fp8": torch.bfloat16}
# Square matmul side: large enough to reach the GEMM peak, small enough to take well under a second.
MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}


@dataclass
class PeakFlops:
    """MFU's denominator and where it came from (for the log line)."""

    value: float  # FLOP/s per device
    source: str  # configured | table | nominal | how it was measured and whether it came from the cache


def peak_flops_per_device(configured: Optional[float], device: torch.device) -> float:
    """`configured` when set; else the table's value for this CUDA device's name; else NOMINAL_PEAK."""
    if configured is not None:
        return float(configured)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in _BF16_PEAK:
            if key in name:
                return peak
    return NOMINAL_PEAK


def resolve_peak_flops(configured: Any, device: torch.device, precision: str) -> PeakFlops:
    """`trainer.peak_flops` (null, a number or `measure`, as validated) -> the peak this run's MFU uses."""
    if configured == MEASURE:
        dtype, path = COMPUTE_DTYPES[precision], cache_path()
        value, cached = measured_peak_flops(device, dtype, path)
        what = f"{str(dtype).removeprefix('torch.')} matmul"
        return PeakFlops(value, f"{what} measured earlier, read from {path}" if cached else
                         f"{what} measured now, saved to {path}")
    value = peak_flops_per_device(configured, device)
    if configured is not None:
        return PeakFlops(value, "configured")
    return PeakFlops(value, "nominal" if value == NOMINAL_PEAK else "table")


def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown cpu"


def device_key(device: torch.device, dtype: torch.dtype) -> str:
    """The cache key: what the peak depends on. A CPU's peak scales with the threads torch uses."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{cpu_model_name()} ({torch.get_num_threads()} threads)"
    return f"{device.type}:{name}:{str(dtype).removeprefix('torch.')}"


def cache_path() -> Path:
    root = os.environ.get("MOEFORGE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "moeforge") / CACHE_FILE


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, size: Optional[int] = None,
                         trials: int = 5) -> float:
    """Dense GEMM FLOP/s of an n×n by n×n matmul on `device` in `dtype`: best of `trials` timed batches after
    two warm-up products (kernel selection, thread pool start). On CUDA a batch is 10 products between two
    synchronisations, so launch latency does not count; on CPU a product is long enough alone."""
    n = size or MATMUL_SIZE.get(device.type, MATMUL_SIZE["cpu"])
    reps = 10 if device.type == "cuda" else 1
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(2):
        torch.matmul(a, b, out=out)
    _sync(device)
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b, out=out)
        _sync(device)
        best = min(best, (time.perf_counter() - start) / reps)
    return 2.0 * n**3 / best


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: measure again and rewrite it
        return {}
    return data if isinstance(data, dict) else {}


def _write_atomically(path: Path, data: dict) -> None:
    """Readers see the old file or the new one, never half of one (concurrent writers: the last one wins)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def measured_peak_flops(device: torch.device, dtype: torch.dtype, path: Optional[Path] = None) -> tuple[float, bool]:
    """(peak FLOP/s of this device in `dtype`, whether it came from the cache): the cached measurement when there
    is one, else `measure_matmul_flops` once, stored for the next run."""
    path = path or cache_path()
    key = device_key(device, dtype)
    cache = _read_cache(path)
    entry = cache.get(key)
    if isinstance(entry, dict) and isinstance(entry.get("flops"), (int, float)) and entry["flops"] > 0:
        return float(entry["flops"]), True
    flops = measure_matmul_flops(device, dtype)
    cache = _read_cache(path)  # another run may have added entries meanwhile
    cache[key] = {"flops": flops, "torch": torch.__version__,
                  "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    _write_atomically(path, cache)
    return flops, False
