"""``report --speed``: prune-eval's rows placed at their *measured* latency on ``bavit
bench``'s curves (ms/image at the bench's batch size, interpolated at each row's mean
sparsity), mAP against it, and the Pareto front (no other row both faster and better)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..evaluate.speedcurve import Curve, curves, pick_curve, read_speed
from ..runtime.errors import OptionError

MARKERS = {"drop": "o", "pool": "s", "preserve": "^"}


def pareto_front(latency, score) -> np.ndarray:
    """Bool per point: on the front, i.e. no other point is at most as slow and at least as
    good with one of the two strictly (NaN points are never on it)."""
    lat, sc = np.asarray(latency, dtype=np.float64), np.asarray(score, dtype=np.float64)
    ok = ~(np.isnan(lat) | np.isnan(sc))
    front = np.zeros(len(lat), dtype=bool)
    for i in np.flatnonzero(ok):
        dominated = ok & (lat <= lat[i]) & (sc >= sc[i]) & ((lat < lat[i]) | (sc > sc[i]))
        front[i] = not dominated.any()
    return front


def _curve_for(cs: list[Curve], where: str, row: dict) -> Curve:
    """The bench curve for a results row: its treatment, dtype and batch size where the
    bench measured them, else the bench's first batch size."""
    t = row.get("treatment") or "drop"
    try:
        return pick_curve(cs, where, dtype=row.get("dtype"), batch_size=int(row["batch_size"]), treatment=t)
    except (OptionError, KeyError, ValueError):
        return pick_curve(cs, where, dtype=row.get("dtype"), treatment=t)


def latency_table(rows: list[dict], speed_dir: str) -> list[dict]:
    """One line per results row: its point, mAP, the measured latency read off the bench
    (BAViT's rows end to end, other selectors the detector alone, dense the dense
    reference) and whether it is on the Pareto front."""
    cs = curves(read_speed(speed_dir))
    out = []
    for r in rows:
        c = _curve_for(cs, speed_dir, r if r["selector"] != "dense" else dict(r, treatment=cs[0].treatment))
        if r["selector"] == "dense":
            lat = c.dense_ms
        else:
            lat = c.latency(float(r["sparsity"]), with_bavit=r["selector"] == "bavit" and c.has_bavit)
        out.append({"selector": r["selector"], "treatment": r.get("treatment") or "drop",
                    "target": r.get("target", float("nan")), "threshold": r.get("threshold", float("nan")),
                    "sparsity": float(r["sparsity"]), "map": float(r["map"]), "latency_ms": lat,
                    "bench": f"{c.runtime} {c.dtype} batch {c.batch_size}"})
    front = pareto_front([o["latency_ms"] for o in out], [o["map"] for o in out])
    for o, f in zip(out, front):
        o["pareto"] = bool(f)
    return out


def map_vs_latency(table: list[dict], path: Path, title: str = "") -> Path:
    from . import figures
    from .figures import COLORS, LABELS

    plt = figures._plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    seen = set()
    for o in table:
        if math.isnan(o["latency_ms"]):
            continue
        key = (o["selector"], o["treatment"])
        lab = None if key in seen else LABELS.get(o["selector"], o["selector"]) + (
            "" if o["treatment"] == "drop" else f" ({o['treatment']})")
        seen.add(key)
        ax.plot(o["latency_ms"], o["map"], MARKERS.get(o["treatment"], "o"), color=COLORS.get(o["selector"], "k"),
                ms=5, alpha=0.85, label=lab, mfc="none" if not o["pareto"] else None)
    f = sorted((o for o in table if o["pareto"]), key=lambda o: o["latency_ms"])
    if f:
        ax.step([o["latency_ms"] for o in f], [o["map"] for o in f], where="post", color="black", lw=1,
                label="Pareto front")
    ax.set_xlabel("measured latency (ms / image, bench)")
    ax.set_ylabel("mAP")
    ax.set_title(title or "mAP vs measured latency")
    ax.legend(fontsize=7)
    return figures._save(fig, path)
