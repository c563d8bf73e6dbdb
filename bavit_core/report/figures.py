"""Matplotlib figures for reports, in one consistent style. Each function writes a PNG."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

COLORS = {"bavit": "#d62728", "oracle": "#2ca02c", "random": "#7f7f7f", "dense": "#1f77b4"}
LABELS = {"bavit": "BAViT + YOLOS", "oracle": "oracle (GT tokens)", "random": "random (same count)", "dense": "dense YOLOS"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
                         "axes.spines.right": False, "font.size": 10, "axes.titleweight": "bold"})
    return plt


def _save(fig, path: Path) -> Path:
    from ..runtime.fileio import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _by_selector(rows):
    out = {}
    for r in rows:
        out.setdefault(r["selector"], []).append(r)
    for v in out.values():
        v.sort(key=lambda r: r["sparsity"])
    return out


def _isnan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def map_vs_sparsity(rows, path: Path, finetuned=()) -> Path:
    """mAP against reached sparsity, one line per selector (and policy), over the whole
    0–100 % range with the y axis from 0; ``finetuned`` rows (YOLOS-F) as stars."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    groups = _by_selector(rows)
    top = max([r["map"] for r in [*rows, *finetuned] if not _isnan(r["map"])] + [1e-3])  # NaN: an empty cell
    for sel, rs in groups.items():
        if sel == "dense":
            ax.axhline(rs[0]["map"], color=COLORS["dense"], ls="--", label=f"{LABELS['dense']} ({rs[0]['map']:.3f})")
            continue
        xs = [100 * r["sparsity"] for r in rs]
        ax.plot(xs, [r["map"] for r in rs], "o-", color=COLORS.get(sel), label=LABELS.get(sel, sel), ms=4)
        for r, x in zip(rs, xs):
            if sel == "bavit" and _isnan(r.get("target")) and not _isnan(r["threshold"]):
                ax.annotate(f"{r['threshold']:.2f}", (x, r["map"]), textcoords="offset points", xytext=(3, 4),
                            fontsize=7, color=COLORS["bavit"])
    for r in finetuned:
        ax.plot([100 * r["sparsity"]], [r["map"]], "*", ms=13, color="#9467bd", mec="black", mew=0.5,
                label=f"BAViT + YOLOS-F ({r['map']:.3f})")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, top * 1.12)
    ax.set_xlabel("sparsity (% of patch tokens pruned)")
    ax.set_ylabel("mAP@[.5:.95]")
    ax.set_title("Accuracy vs sparsity")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _rel_err(r, with_dense=True) -> float:
    a = r.get("latency_spread", float("nan"))
    b = r.get("dense_spread", float("nan")) if with_dense else 0.0
    if _isnan(a) or _isnan(b):
        return 0.0
    return math.hypot(a, b)


def speedup_vs_sparsity(rows, path: Path, ideal: tuple[np.ndarray, np.ndarray] | None = None) -> Path:
    """Measured detector and end-to-end speedups per selector with error bars (the spreads
    of the row and of the dense reference, combined), and the FLOP-ideal curve ``ideal`` =
    (sparsity array, dense/pruned FLOP ratio array) of the detector alone. Rows whose
    timing is noisy are drawn hollow."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for sel, rs in _by_selector(rows).items():
        if sel == "dense" or all(_isnan(r["detector_speedup"]) for r in rs):
            continue
        xs = np.array([100 * r["sparsity"] for r in rs])
        ys = np.array([r["detector_speedup"] for r in rs])
        err = ys * np.array([_rel_err(r) for r in rs])
        ax.errorbar(xs, ys, yerr=err, fmt="-", color=COLORS.get(sel), capsize=2, lw=1.2,
                    label=f"{LABELS.get(sel, sel)}: detector")
        noisy = np.array([bool(r.get("timing_noisy")) for r in rs])
        ax.plot(xs[~noisy], ys[~noisy], "o", color=COLORS.get(sel), ms=4)
        ax.plot(xs[noisy], ys[noisy], "o", mfc="white", mec=COLORS.get(sel), ms=5)
        if sel == "bavit":
            e2e = np.array([r["speedup"] for r in rs])
            ax.errorbar(xs, e2e, yerr=e2e * np.array([_rel_err(r) for r in rs]), fmt="s--", color=COLORS["bavit"],
                        alpha=0.6, capsize=2, ms=3, label="BAViT + YOLOS: end to end")
    if ideal is not None:
        ax.plot(100 * ideal[0], ideal[1], "k-", alpha=0.3, lw=3, label="FLOP-ideal (detector)")
    ax.axhline(1.0, color=COLORS["dense"], ls="--", lw=1)
    ax.set_xlim(0, 100)
    ax.set_xlabel("sparsity (% of patch tokens pruned)")
    ax.set_ylabel("speedup over dense YOLOS (x)")
    bs = rows[0]["batch_size"] if rows else math.nan
    ax.set_title(f"Measured speed ({rows[0]['device']}{'' if _isnan(bs) else f', batch {int(bs)}'})" if rows else "Speed",
                 fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def reduction_vs_map(rows, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for sel, rs in _by_selector(rows).items():
        ax.plot([r["token_reduction_pct"] for r in rs], [r["map"] for r in rs], "o-" if len(rs) > 1 else "o",
                color=COLORS.get(sel), label=LABELS.get(sel, sel))
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("token reduction incl. BAViT's tokens (%, paper eq. 4)")
    ax.set_ylabel("mAP@[.5:.95]")
    ax.set_title("Token reduction vs accuracy")
    ax.legend(fontsize=8)
    return _save(fig, path)


def training_curves(metrics: list[dict], path: Path, title: str = "BAViT training") -> Path:
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    ep = [r["epoch"] + 1 for r in metrics]
    a.plot(ep, [r["train_loss"] for r in metrics], label="train")
    if "val_loss" in metrics[0]:
        a.plot(ep, [r["val_loss"] for r in metrics], label="val")
    a.set_xlabel("epoch"), a.set_ylabel("loss"), a.set_title("Accumulative CE loss"), a.legend()
    for k, lab in (("train_accuracy", "train acc"), ("val_accuracy", "val acc"), ("val_recall", "val FG recall"),
                   ("val_iou", "val FG IoU")):
        if k in metrics[0]:
            b.plot(ep, [r[k] for r in metrics], label=lab)
    b.set_xlabel("epoch"), b.set_ylim(0, 1), b.set_title("Token metrics"), b.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def sparsity_hist(per_image: dict[str, list[float]], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(0, 1, 26)
    for name, vals in per_image.items():
        ax.hist(vals, bins=bins, alpha=0.55, label=f"{name} (mean {np.mean(vals):.2f})")
    ax.set_xlabel("per-image sparsity")
    ax.set_ylabel("images")
    ax.set_title("How much each image prunes")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _grid_overlay(img: np.ndarray, grid: np.ndarray, fg_color=(230, 20, 20), bg_grey=0.45, alpha=0.6) -> np.ndarray:
    """Image with FG tokens tinted red and BG tokens greyed, grid lines drawn."""
    h, w = img.shape[:2]
    gh, gw = grid.shape
    ys = (np.arange(h) * gh // h)
    xs = (np.arange(w) * gw // w)
    cell = grid[ys[:, None], xs[None, :]]
    out = img.astype(np.float32).copy()
    grey = out.mean(axis=2, keepdims=True) * bg_grey + 255 * (1 - bg_grey) * 0.5
    out = np.where(cell[:, :, None], out * (1 - alpha) + np.array(fg_color) * alpha, grey)
    edge_y = np.r_[False, ys[1:] != ys[:-1]]
    edge_x = np.r_[False, xs[1:] != xs[:-1]]
    out[edge_y, :] = out[edge_y, :] * 0.5 + 255 * 0.5
    out[:, edge_x] = out[:, edge_x] * 0.5 + 255 * 0.5
    return out.clip(0, 255).astype(np.uint8)


def _blank_bg(img: np.ndarray, grid: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    gh, gw = grid.shape
    cell = grid[(np.arange(h) * gh // h)[:, None], (np.arange(w) * gw // w)[None, :]]
    return np.where(cell[:, :, None], img, 255).astype(np.uint8)


def _image_pairs(images, below, path: Path, title: str, top_titles=None, below_titles=None) -> Path:
    """Each image above its processed version ``below``, one column per image."""
    plt = _plt()
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(2.6 * n, 4.4), squeeze=False)
    for k in range(n):
        axes[0, k].imshow(images[k])
        axes[1, k].imshow(below[k])
        for a, names in ((axes[0, k], top_titles), (axes[1, k], below_titles)):
            if names:
                a.set_title(names[k], fontsize=8)
        for a in axes[:, k]:
            a.axis("off")
    fig.suptitle(title)
    return _save(fig, path)


def overlays(images: list[np.ndarray], grids: list[np.ndarray], path: Path, titles=None,
             title="FG tokens (red) and BG tokens (grey)") -> Path:
    return _image_pairs(images, [_grid_overlay(im, g) for im, g in zip(images, grids)], path, title, titles)


def sparse_images(images, grids, path: Path) -> Path:
    return _image_pairs(images, [_blank_bg(im, g) for im, g in zip(images, grids)], path,
                        "What the detector sees: BG patches blanked",
                        below_titles=[f"sparsity {100 * (1 - g.mean()):.0f} %" for g in grids])


def before_after(images, gts, preds, refined, path: Path, steps: int) -> Path:
    plt = _plt()
    n = len(images)
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 1.95 * n), squeeze=False)
    for k in range(n):
        for j, (g, name) in enumerate(((gts[k], "ground truth"), (preds[k], "BAViT"), (refined[k], f"after {steps} clean-up steps"))):
            axes[k, j].imshow(_grid_overlay(images[k], g))
            axes[k, j].axis("off")
            if k == 0:
                axes[k, j].set_title(name, fontsize=9)
    fig.suptitle("Post-processing: BG tokens surrounded by FG turn FG")
    return _save(fig, path)


def detections(images, dets_a, dets_b, names: tuple[str, str], grids_b, path: Path, id2name=None,
               score_min: float = 0.5) -> Path:
    plt = _plt()
    from matplotlib.patches import Rectangle

    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(2.8 * n, 5), squeeze=False)
    for row, (dets, name) in enumerate(((dets_a, names[0]), (dets_b, names[1]))):
        for k in range(n):
            ax = axes[row, k]
            img = images[k] if row == 0 or grids_b is None else _blank_bg(images[k], grids_b[k])
            ax.imshow(img)
            for d in dets[k]:
                if d["score"] < score_min:
                    continue
                x, y, w, h = d["bbox"]
                ax.add_patch(Rectangle((x, y), w, h, fill=False, lw=1.5, color="#ffdd00"))
                lab = (id2name or {}).get(d["category_id"], str(d["category_id"]))
                ax.text(x, y, f"{lab} {d['score']:.2f}", fontsize=6, color="black",
                        bbox=dict(facecolor="#ffdd00", alpha=0.8, pad=0.5, lw=0))
            ax.axis("off")
            if k == 0:
                ax.set_title(name, fontsize=9, loc="left")
    fig.suptitle(f"Detections (score ≥ {score_min})")
    return _save(fig, path)


TREATMENT_COLORS = {"drop": "#d62728", "pool": "#9467bd", "preserve": "#17becf"}


def treatments(rows, path: Path, selector: str = "bavit") -> Path:
    """What happens to pruned tokens: mAP vs sparsity with one line per treatment (drop,
    pool, preserve) for ``selector``'s rows, and each treatment's measured end-to-end
    speedup beside its own FLOP-ideal (rows' ``speedup`` and ``flop_speedup``)."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    groups = {}
    for r in rows:
        if r["selector"] == selector:
            groups.setdefault(r.get("treatment", "drop"), []).append(r)
    dense = [r for r in rows if r["selector"] == "dense"]
    for t, rs in groups.items():
        rs.sort(key=lambda r: r["sparsity"])
        xs = [100 * r["sparsity"] for r in rs]
        c = TREATMENT_COLORS.get(t)
        a.plot(xs, [r["map"] for r in rs], "o-", color=c, label=t)
        b.plot(xs, [r["speedup"] for r in rs], "o-", color=c, label=f"{t}: measured")
        b.plot(xs, [r["flop_speedup"] for r in rs], ":", color=c, alpha=0.8, label=f"{t}: FLOP-ideal")
    if dense:
        a.axhline(dense[0]["map"], color=COLORS["dense"], ls="--", label=f"{LABELS['dense']} ({dense[0]['map']:.3f})")
    b.axhline(1.0, color=COLORS["dense"], ls="--", lw=1)
    a.set_xlabel("sparsity (% of patch tokens pruned)"), a.set_ylabel("mAP@[.5:.95]")
    a.set_title(f"Pruned tokens: accuracy ({LABELS.get(selector, selector)})", fontsize=9)
    b.set_xlabel("sparsity (% of patch tokens pruned)"), b.set_ylabel("speedup over dense YOLOS (x)")
    b.set_title("Pruned tokens: end-to-end speed vs each one's FLOP ideal", fontsize=9)
    a.legend(fontsize=8), b.legend(fontsize=7)
    return _save(fig, path)
