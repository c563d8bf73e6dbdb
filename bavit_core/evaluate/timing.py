"""Side-by-side timing (interleaved, warmed up, medians) and peak-memory probes."""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable

import torch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict[str, Callable[[], object]], device, repeats: int = 5, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, calling them in turn (A, B, A, B, ...)."""
    with torch.inference_mode():
        for _ in range(warmup):
            for f in fns.values():
                f()
        _sync(device)
        times = {k: [] for k in fns}
        for _ in range(repeats):
            for k, f in fns.items():
                _sync(device)
                t = time.perf_counter()
                f()
                _sync(device)
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _rss_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_memory_mb(fn: Callable[[], object], device) -> float:
    """Peak memory of one call: CUDA allocator peak on GPU; on CPU the growth of the
    resident set's high-water mark over its level before the call (Linux; NaN elsewhere)."""
    with torch.inference_mode():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            torch.cuda.synchronize(device)
            return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        except OSError:
            return float("nan")
        before = _rss_kb("VmRSS")
        fn()
        peak = _rss_kb("VmHWM")
        if before is None or peak is None:
            return float("nan")
        return max(peak - before, 0) / 1024
