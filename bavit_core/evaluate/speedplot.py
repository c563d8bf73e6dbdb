"""bench's figure: measured speedup over dense vs sparsity beside the FLOP-ideal, the
detector alone and end to end, one panel per batch size, the break-even marked."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .speedcurve import Curve


def speed_figure(cs: list[Curve], path: Path, machine: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..runtime.fileio import atomic_path

    batches = sorted({c.batch_size for c in cs}) or [1]
    fig, axes = plt.subplots(1, len(batches), figsize=(5.2 * len(batches), 4.2), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, b in zip(axes[0], batches):
        mine = [c for c in cs if c.batch_size == b]
        top = 1.0
        for i, c in enumerate(mine):
            col = colors[i % len(colors)]
            det = c.dense_ms / c.detector_ms
            ax.plot(c.sparsity, det, "--o", color=col, ms=3, alpha=0.7, label=f"{c.runtime} {c.dtype} {c.treatment}: detector")
            top = max(top, float(np.nanmax(det)))
            if c.has_bavit:
                e2e = c.dense_ms / c.end_to_end_ms
                ax.plot(c.sparsity, e2e, "-o", color=col, ms=3, label=f"{c.runtime} {c.dtype} {c.treatment}: end to end")
            if c.flop_detector is not None:
                top = max(top, float(np.nanmax(c.flop_detector)))
                ax.plot(c.sparsity, c.flop_detector, ":", color=col, lw=1, label=f"{c.treatment}: FLOP-ideal, detector")
            if c.has_bavit and c.flop_end_to_end is not None:
                ax.plot(c.sparsity, c.flop_end_to_end, "-.", color=col, lw=1, alpha=0.6,
                        label=f"{c.treatment}: FLOP-ideal, end to end")
            s, how = c.break_even()
            if not math.isnan(s):
                ax.axvline(s, color=col, lw=0.8, ls=":")
                ax.annotate(f"break-even {s:.2f}", (s, 1.0), xytext=(4, 6 + 12 * i), textcoords="offset points",
                            fontsize=8, color=col)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_ylim(0, min(top * 1.15, 12))
        ax.set_xlabel("sparsity (share of patch tokens pruned)")
        ax.set_ylabel("speedup over dense (×)")
        ax.set_title(f"batch {b}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Measured speedup vs sparsity — {machine}", fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight", dpi=110)
    plt.close(fig)
    return path
