"""``bavit bench``'s speed.csv: its schema, writer and reader, and what is read off its
curves: the break-even sparsity, the latency at a kept-token share, and the lowest
sparsity that meets a latency budget. Every curve is one (runtime, dtype, batch size,
treatment) and is read by straight-line interpolation between measured points."""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..runtime.errors import InputFileError, OptionError

SPEED_FILE = "speed.csv"
SPEED_COLUMNS = (
    "runtime", "device", "dtype", "batch_size", "workload", "treatment", "kept", "kept_tokens", "n_patches",
    "sparsity", "latency_ms", "latency_spread", "cpu_ms", "cpu_spread", "throughput_ips", "repeats",
    "dense_latency_ms", "bavit_latency_ms", "end_to_end_ms", "detector_speedup", "speedup", "flop_speedup",
    "flop_speedup_end_to_end", "noisy",
)
TEXT = ("runtime", "device", "dtype", "workload", "treatment")
INTS = ("batch_size", "n_patches", "repeats")
WORKLOADS = ("dense", "bavit", "pruned")


def write_speed_csv(path: Path, rows: list[dict]) -> str:
    """speed.csv's text for ``rows`` (the caller writes it atomically)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(SPEED_COLUMNS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def read_speed(speed_dir: str | Path) -> list[dict]:
    """The rows of ``speed_dir``/speed.csv (a directory from ``bavit bench``, or the file
    itself), numbers as numbers; a file that is not bench's is one clean error."""
    p = Path(speed_dir)
    if p.is_dir():
        p = p / SPEED_FILE
    if not p.is_file():
        raise InputFileError(p, "not found (give the --out directory of bavit bench)")
    try:
        rows = list(csv.DictReader(io.StringIO(p.read_text())))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputFileError(p, f"unreadable speed.csv ({exc})") from None
    if not rows:
        raise InputFileError(p, "speed.csv holds no rows")
    missing = [c for c in SPEED_COLUMNS if c not in rows[0]]
    if missing:
        raise InputFileError(p, f"speed.csv without column(s) {', '.join(missing[:4])} (not from bavit bench?)")
    out = []
    for i, r in enumerate(rows, start=2):
        d = {}
        for k in SPEED_COLUMNS:
            v = r[k]
            try:
                if k in TEXT:
                    d[k] = v
                elif k in INTS:
                    d[k] = int(v)
                elif k == "noisy":
                    if v not in ("True", "False"):
                        raise ValueError
                    d[k] = v == "True"
                else:
                    d[k] = float(v) if v != "" else float("nan")
            except (TypeError, ValueError):
                raise InputFileError(p, f"line {i}: {k} = {v!r} is not a valid value") from None
        if d["workload"] not in WORKLOADS:
            raise InputFileError(p, f"line {i}: unknown workload {d['workload']!r}")
        out.append(d)
    return out


def crossing(x, y, level: float) -> tuple[float, str]:
    """The smallest ``x`` from which ``y`` (interpolated along the points sorted by x)
    stays at or above ``level`` up to the last point. Returns (x, how): ``crossed``
    (interpolated between the last point below and the next), ``from_start`` (every point
    is at or above: the first x), ``never`` (the last point is below: NaN)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = ~(np.isnan(x) | np.isnan(y))
    x, y = x[ok], y[ok]
    if len(x) == 0:
        return float("nan"), "never"
    o = np.argsort(x, kind="stable")
    x, y = x[o], y[o]
    below = np.flatnonzero(y < level)
    if len(below) == 0:
        return float(x[0]), "from_start"
    i = int(below[-1])
    if i == len(x) - 1:
        return float("nan"), "never"
    x0, x1, y0, y1 = x[i], x[i + 1], y[i], y[i + 1]
    return float(x0 + (level - y0) * (x1 - x0) / (y1 - y0)), "crossed"


def interpolate(x, y, at: float) -> float:
    """``y`` at ``at`` on the straight lines between the points sorted by x (NaN outside
    the measured range)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    o = np.argsort(x, kind="stable")
    x, y = x[o], y[o]
    if len(x) == 0 or not (x[0] - 1e-9 <= at <= x[-1] + 1e-9):
        return float("nan")
    return float(np.interp(at, x, y))


@dataclass
class Curve:
    """One measured curve: per pruned point its sparsity, detector-alone and end-to-end
    latency (ms/image; end to end adds BAViT's, NaN without a BAViT) and speedups, and
    the dense reference."""
    runtime: str
    dtype: str
    batch_size: int
    treatment: str
    device: str
    sparsity: np.ndarray
    detector_ms: np.ndarray
    end_to_end_ms: np.ndarray
    dense_ms: float
    bavit_ms: float
    flop_detector: np.ndarray | None = None  # FLOP-ideal speedups at the same points
    flop_end_to_end: np.ndarray | None = None

    @property
    def label(self) -> str:
        return f"{self.runtime} {self.dtype} batch {self.batch_size} {self.treatment}"

    @property
    def has_bavit(self) -> bool:
        return not math.isnan(self.bavit_ms)

    def latency(self, sparsity: float, with_bavit: bool) -> float:
        """Interpolated ms/image at a mean sparsity (end to end when ``with_bavit``)."""
        return interpolate(self.sparsity, self.end_to_end_ms if with_bavit else self.detector_ms, sparsity)

    def break_even(self) -> tuple[float, str]:
        """The sparsity from which end to end (BAViT + pruned; the detector alone without
        a BAViT) is at least as fast as dense: :func:`crossing` of speedup 1.0."""
        lat = self.end_to_end_ms if self.has_bavit else self.detector_ms
        return crossing(self.sparsity, self.dense_ms / lat, 1.0)


def curves(rows: list[dict]) -> list[Curve]:
    """Every (runtime, dtype, batch size, treatment) curve of a speed.csv."""
    out = []
    groups = dict.fromkeys((r["runtime"], r["dtype"], r["batch_size"]) for r in rows)
    for rt, dt, bs in groups:
        g = [r for r in rows if (r["runtime"], r["dtype"], r["batch_size"]) == (rt, dt, bs)]
        dense = [r["latency_ms"] for r in g if r["workload"] == "dense"]
        bav = [r["latency_ms"] for r in g if r["workload"] == "bavit"]
        for t in dict.fromkeys(r["treatment"] for r in g if r["workload"] == "pruned"):
            p = sorted((r for r in g if r["workload"] == "pruned" and r["treatment"] == t), key=lambda r: r["sparsity"])
            out.append(Curve(rt, dt, bs, t, g[0]["device"], np.array([r["sparsity"] for r in p]),
                             np.array([r["latency_ms"] for r in p]), np.array([r["end_to_end_ms"] for r in p]),
                             dense[0] if dense else float("nan"), bav[0] if bav else float("nan"),
                             np.array([r["flop_speedup"] for r in p]),
                             np.array([r["flop_speedup_end_to_end"] for r in p])))
    return out


def pick_curve(cs: list[Curve], where: str, runtime: str | None = None, dtype: str | None = None,
               batch_size: int | None = None, treatment: str | None = None) -> Curve:
    """The curve measured under these settings (None: any); a clear error naming what
    the bench at ``where`` measured when none was."""
    want = {"runtime": runtime, "dtype": dtype, "batch_size": batch_size, "treatment": treatment}
    for c in cs:
        if all(v is None or getattr(c, k) == v for k, v in want.items()):
            return c
    have = "; ".join(sorted({c.label for c in cs}))
    ask = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in want.items() if v is not None)
    raise OptionError(f"the bench at {where} measured no curve for {ask} (it has: {have}); "
                      "rerun bavit bench with those settings")


@dataclass
class BudgetPick:
    sparsity: float  # the target added to the sweep (rounded up to 0.01: still within the budget)
    latency_ms: float  # the curve's end-to-end latency there
    curve: Curve


def sparsity_for_budget(curve: Curve, budget_ms: float, where: str = "") -> BudgetPick:
    """The lowest sparsity from which the curve's measured end-to-end latency (the
    detector alone without a BAViT) stays within ``budget_ms`` ms/image, rounded up to a
    hundredth (as prune-eval names its targets); an error saying so when no measured
    sparsity meets it."""
    if not budget_ms > 0:
        raise OptionError(f"--latency-budget must be a positive number of ms, got {budget_ms}")
    lat = curve.end_to_end_ms if curve.has_bavit else curve.detector_ms
    s, how = crossing(curve.sparsity, -lat, -budget_ms)
    what = "end to end" if curve.has_bavit else "detector alone"
    if how == "never":
        k = int(np.nanargmin(lat))
        raise OptionError(f"no operating point meets --latency-budget {budget_ms:g} ms: the fastest measured "
                          f"({curve.label}, sparsity {curve.sparsity[k]:.2f}) takes {lat[k]:.1f} ms/image {what} "
                          f"on {curve.device} (bench {where})")
    s = min(math.ceil(round(s * 100, 6)) / 100, 0.99)
    return BudgetPick(s, curve.latency(s, curve.has_bavit), curve)
