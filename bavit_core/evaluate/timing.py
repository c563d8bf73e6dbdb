"""Side-by-side timing (round robin, warmed up, medians with their spread), the peak
memory of a forward's own allocations, and the machine's load."""
from __future__ import annotations

import os
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

NOISY_SPREAD = 0.10  # a spread (IQR / median) or a dense drift above this marks timing noisy


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Samples:
    """Repeated measurements of one function: wall-clock seconds per call and, beside
    them, the process's CPU seconds per call (all its threads; on a shared machine CPU
    time counts the work and not the waiting, so a load spike shows as a gap between the
    two)."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return float(np.median(self.wall)) if self.wall else float("nan")

    @property
    def spread(self) -> float:
        return spread(self.wall)

    @property
    def cpu_median(self) -> float:
        return float(np.median(self.cpu)) if self.cpu else float("nan")

    @property
    def cpu_spread(self) -> float:
        return spread(self.cpu)


def measure(fns: dict[str, Callable[[], object]], device, repeats: int = 3, max_repeats: int | None = None,
            target_spread: float = NOISY_SPREAD / 2, warmup: int = 1, tick: Callable[[], None] | None = None,
            warmup_fns: dict[str, Callable[[], object]] | None = None) -> dict[str, Samples]:
    """The toolkit's one timing loop (prune-eval's rows, ``bavit bench``, the benchmark
    scripts): every function called once per round, round robin, each round starting one
    further along the list (so no function always runs first), after ``warmup`` discarded
    rounds (calling ``warmup_fns`` where given, e.g. the same work on one batch).

    At least ``repeats`` rounds; with ``max_repeats`` above it, rounds continue until every
    function's spread (IQR / median of its wall times) is at most ``target_spread`` or
    ``max_repeats`` rounds ran: a quiet machine stops early, a noisy one buys more samples.
    ``tick`` is called after each warm-up call and each timed call (progress)."""
    names = list(fns)
    out = {k: Samples() for k in names}
    warm = warmup_fns or fns
    top = max(repeats, max_repeats or repeats)
    with torch.inference_mode():
        for _ in range(warmup):
            for k in names:
                warm[k]()
                if tick:
                    tick()
        _sync(device)
        for r in range(top):
            if r >= repeats and all(s.spread <= target_spread for s in out.values()):
                break
            for j in range(len(names)):
                k = names[(j + r) % len(names)]
                _sync(device)
                c, t = time.process_time(), time.perf_counter()
                fns[k]()
                _sync(device)
                out[k].wall.append(time.perf_counter() - t)
                out[k].cpu.append(time.process_time() - c)
                if tick:
                    tick()
    return out


def time_round_robin(fns: dict[str, Callable[[], object]], device, repeats: int = 3, warmup: int = 1,
                     tick: Callable[[], None] | None = None,
                     warmup_fns: dict[str, Callable[[], object]] | None = None) -> dict[str, list[float]]:
    """Wall seconds per call of every function, exactly ``repeats`` samples each, measured
    round robin by :func:`measure`."""
    return {k: s.wall for k, s in measure(fns, device, repeats, None, warmup=warmup, tick=tick,
                                          warmup_fns=warmup_fns).items()}


def time_interleaved(fns: dict[str, Callable[[], object]], device, repeats: int = 5, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, measured round robin (see time_round_robin)."""
    return {k: float(np.median(v)) for k, v in time_round_robin(fns, device, repeats, warmup).items()}


def spread(samples) -> float:
    """IQR / median of repeated measurements (NaN with fewer than two)."""
    v = np.asarray(samples, dtype=np.float64)
    if len(v) < 2 or not np.median(v) > 0:
        return float("nan")
    q1, q3 = np.percentile(v, [25, 75])
    return float((q3 - q1) / np.median(v))


def drift(samples) -> float:
    """Relative change of a measurement over a run: median of the last half of the samples
    against the first half, |last - first| / first (NaN with fewer than two)."""
    v = np.asarray(samples, dtype=np.float64)
    if len(v) < 2:
        return float("nan")
    h = len(v) // 2
    first, last = np.median(v[:h]), np.median(v[-h:])
    return float(abs(last - first) / first) if first > 0 else float("nan")


def is_noisy(*spreads_or_drifts: float) -> bool:
    """A timing is noisy when any of its spreads or the dense reference's drift passes
    :data:`NOISY_SPREAD` (NaN, too few samples to tell, counts as quiet)."""
    return bool(max([float(np.nan_to_num(v)) for v in spreads_or_drifts] or [0.0]) > NOISY_SPREAD)


def machine_load() -> dict:
    """The 1/5/15-minute load averages and the CPU count (load is NaN where unknown)."""
    try:
        la = os.getloadavg()
    except OSError:
        la = (float("nan"),) * 3
    return {"load_1m": la[0], "load_5m": la[1], "load_15m": la[2], "cpus": os.cpu_count()}


class _AllocTracker(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the bytes of every tensor storage an operator creates while active, minus
    those freed again; ``peak`` is the high-water mark."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_flatten

        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0]
                  if isinstance(a, torch.Tensor) and a.device.type == "cpu"}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t._base is not None or t.device.type != "cpu":
                continue
            st = t.untyped_storage()
            key, nb = st.data_ptr(), st.nbytes()
            if nb == 0 or key in self._seen or key in inputs:  # views and in-place results allocate nothing
                continue
            self._seen.add(key)
            self.live += nb
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._free, key, nb)
        return out

    def _free(self, key, nb):
        if key in self._seen:
            self._seen.discard(key)
            self.live -= nb


def peak_memory_mb(fn: Callable[[], object], device) -> float:
    """Peak memory of one call's own allocations, in MiB. CUDA: the allocator's peak over
    its level before the call. CPU: the high-water mark of the bytes held by tensors that
    the call's operators created (weights and inputs, which exist before, do not count;
    scratch space inside a single kernel is not seen)."""
    with torch.inference_mode():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            torch.cuda.synchronize(device)
            return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
        tracker = _AllocTracker()
        with tracker:
            out = fn()
        del out
        return tracker.peak / 2 ** 20


def _cpu_model() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device) -> dict:
    """What a timing was taken on: the CPU model, cores and torch's threads, or the GPU's
    name; torch, CUDA and onnxruntime versions (None where absent)."""
    import platform

    info = {"cpu": _cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "gpu": None, "onnxruntime": None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def describe_machine(info: dict) -> str:
    """One line naming the machine (for tables and figure titles)."""
    where = info["gpu"] or f"{info['cpu']}, {info['cores']} cores, torch {info['torch_threads']} threads"
    versions = f"torch {info['torch']}" + (f", CUDA {info['cuda']}" if info.get("gpu") else "")
    if info.get("onnxruntime"):
        versions += f", onnxruntime {info['onnxruntime']}"
    return f"{where}; {versions}"
