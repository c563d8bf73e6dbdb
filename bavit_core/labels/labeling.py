"""Annotations → patch-level FG/BG label grids (``bavit label``).

One row per image. ``scores`` hold the continuous per-token value the FG decision is
made from (box overlap or mask pixel fraction), so thresholds can change without
relabelling; ``fg`` holds the decision under the options in the file's metadata.
"""
from __future__ import annotations

import multiprocessing as mp
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .. import __version__
from ..data import AnnotationSet
from ..data.grid import CRITERIA, GridSpec, cell_pixel_counts, cell_sizes, image_box_scores
from ..runtime.errors import InputFileError, OptionError
from ..runtime.fileio import check_output_writable, refuse_output_over_inputs, sha256_bytes, sha256_file
from .labelfile import FORMAT, threshold_scores, write_labels

SOURCES = ("boxes", "masks")
VOID_MODES = ("bg", "fg", "ignore")
INCLUDE_EXCLUDE = ("include", "exclude")

Progress = Callable[[int, int], None]


@dataclass
class LabelOptions:
    source: str = "boxes"
    criterion: str = "coverage"
    tau: float = 0.5
    mask_threshold: float = 0.10
    grid: GridSpec = field(default_factory=GridSpec)
    crowd: str = "include"
    difficult: str = "include"
    void: str = "bg"

    def validate(self) -> None:
        if self.source not in SOURCES:
            raise OptionError(f"unknown --source {self.source!r}; choose one of {', '.join(SOURCES)}")
        if self.criterion not in CRITERIA:
            raise OptionError(f"unknown --criterion {self.criterion!r}; choose one of {', '.join(CRITERIA)}")
        if not 0.0 <= self.tau <= 1.0:
            raise OptionError(f"--tau must be in [0, 1], got {self.tau}")
        if not 0.0 <= self.mask_threshold < 1.0:
            raise OptionError(f"--mask-threshold must be in [0, 1), got {self.mask_threshold}")
        for name in ("crowd", "difficult"):
            if getattr(self, name) not in INCLUDE_EXCLUDE:
                raise OptionError(f"--{name} must be include or exclude")
        if self.void not in VOID_MODES:
            raise OptionError(f"unknown --void {self.void!r}; choose one of {', '.join(VOID_MODES)}")

    @property
    def threshold(self) -> float:
        return self.tau if self.source == "boxes" else self.mask_threshold

    @property
    def comparison(self) -> str:
        """FG when score >= tau (boxes, paper eq. 1) or score > threshold (masks)."""
        return ">=" if self.source == "boxes" else ">"

    def as_dict(self) -> dict:
        d = asdict(self)
        d["grid"] = self.grid.as_dict()
        return d


@dataclass
class LabelSummary:
    out: Path
    images_listed: int
    images_labelled: int
    annotations_used: int
    skipped: dict[str, int]
    notes: dict[str, int]
    fg_fraction_mean: float
    fg_fraction_median: float
    seconds: float


# --------------------------------------------------------------------------- computing
def compute_box_scores(aset: AnnotationSet, opts: LabelOptions) -> tuple[np.ndarray, np.ndarray, int]:
    """(N, gh, gw) max overlap scores, objects per image, boxes used."""
    keep = aset.select_boxes(opts.crowd, opts.difficult)
    boxes, box_img = aset.boxes[keep], aset.box_image[keep]
    scores = image_box_scores(boxes, box_img, aset.widths, aset.heights, opts.grid.shape, opts.criterion)
    n_obj = np.bincount(box_img, minlength=aset.n_images)
    return scores, n_obj, int(len(boxes))


_JOB: dict = {}


def _mask_range(bounds: tuple[int, int]):
    """Worker body: mask fractions of images [start, stop) of the job set up in _JOB."""
    aset, opts = _JOB["aset"], _JOB["opts"]
    start, stop = bounds
    gh, gw = opts.grid.shape
    scores = np.zeros((stop - start, gh, gw), dtype=np.float64)
    ok = np.zeros(stop - start, dtype=bool)
    n_obj = np.zeros(stop - start, dtype=np.int64)
    issues: Counter = Counter()
    for k, i in enumerate(range(start, stop)):
        h, w = int(aset.heights[i]), int(aset.widths[i])
        if h < gh or w < gw:
            issues["image smaller than the token grid"] += 1
            continue
        fg, valid, n, iss = aset.mask_fn(i, crowd=opts.crowd, difficult=opts.difficult)
        issues.update(iss)
        if fg is None:
            continue
        counts = cell_pixel_counts(fg, (gh, gw))
        if valid is None:
            total = cell_sizes(h, w, (gh, gw))
        else:
            total = cell_pixel_counts(valid, (gh, gw))
        with np.errstate(invalid="ignore", divide="ignore"):
            scores[k] = np.where(total > 0, counts / np.maximum(total, 1), 0.0)
        ok[k] = True
        n_obj[k] = n
    return start, scores, ok, n_obj, issues


# Rasterising one image's masks holds several full-size arrays (pycocotools' uint8 mask,
# int64 pixel counts per cell): ~10 bytes a pixel, 2.5 GiB at this bound (16384 x 16384).
MAX_MASK_PIXELS = 1 << 28


def check_mask_sizes(aset: AnnotationSet) -> None:
    """Refuse, before any work, an image whose declared size is too large to rasterise its
    masks (an entry declaring 60000 x 60000 pixels would ask for 27 GiB): one error naming
    the annotation file and the entry."""
    pixels = aset.widths.astype(np.int64) * aset.heights.astype(np.int64)
    big = np.flatnonzero(pixels > MAX_MASK_PIXELS)
    if len(big):
        i = int(big[0])
        more = f" (and {len(big) - 1} more)" if len(big) > 1 else ""
        raise InputFileError(aset.entry_source(i), f"image {int(aset.image_ids[i])} ({aset.file_names[i]}) declares "
                             f"{int(aset.widths[i])}x{int(aset.heights[i])} pixels{more}, too large to rasterise "
                             f"its masks (at most {MAX_MASK_PIXELS:,} pixels); fix its size or label from boxes")


def compute_mask_scores(
    aset: AnnotationSet, opts: LabelOptions, workers: int = 1, progress: Progress | None = None,
    chunk: int = 256,
):
    """(N, gh, gw) FG pixel fractions, a success flag per image, objects per image, issues."""
    check_mask_sizes(aset)
    n = aset.n_images
    gh, gw = opts.grid.shape
    scores = np.zeros((n, gh, gw), dtype=np.float64)
    ok = np.zeros(n, dtype=bool)
    n_obj = np.zeros(n, dtype=np.int64)
    issues: Counter = Counter()
    ranges = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    _JOB["aset"], _JOB["opts"] = aset, opts
    try:
        if workers > 1 and len(ranges) > 1:
            ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
            with ctx.Pool(workers) as pool:
                results = pool.imap_unordered(_mask_range, ranges)
                for res in results:
                    _merge_mask_result(res, scores, ok, n_obj, issues, progress, n)
        else:
            for r in ranges:
                _merge_mask_result(_mask_range(r), scores, ok, n_obj, issues, progress, n)
    finally:
        _JOB.clear()
    return scores, ok, n_obj, issues


def _merge_mask_result(res, scores, ok, n_obj, issues, progress, n):
    start, s, o, no, iss = res
    stop = start + len(s)
    scores[start:stop], ok[start:stop], n_obj[start:stop] = s, o, no
    issues.update(iss)
    if progress:
        progress(stop - start, n)


def label_dataset(
    aset: AnnotationSet,
    opts: LabelOptions,
    out: str | Path,
    workers: int = 1,
    progress: Progress | None = None,
    extra_meta: dict | None = None,
) -> LabelSummary:
    """Label every image of ``aset`` and write the labels parquet atomically to ``out``."""
    opts.validate()
    if workers < 0:
        raise OptionError(f"--workers must be >= 0 (0 = automatic), got {workers}")
    if workers == 0:  # automatic, as train's image decoding: one per usable core, up to 4
        from ..runtime.workers import usable_cores

        workers = min(4, usable_cores())
    refuse_output_over_inputs(out, list(aset.source_files) + ([aset.images_dir] if aset.images_dir else []))
    check_output_writable(out)
    t0 = time.perf_counter()
    skipped = Counter(aset.skipped)
    n = aset.n_images
    if opts.source == "boxes":
        scores, n_obj, used = compute_box_scores(aset, opts)
        ok = np.ones(n, dtype=bool)
        if progress:
            progress(n, n)
    else:
        if aset.mask_fn is None:
            raise OptionError(f"{aset.kind} dataset was opened without masks")
        scores, ok, n_obj, issues = compute_mask_scores(aset, opts, workers, progress)
        skipped.update(issues)
        used = int(n_obj[ok].sum())
    if not ok.any():
        raise InputFileError(aset.source_files[0], "no image could be labelled (" +
                             ", ".join(f"{k}: {v}" for k, v in skipped.items() if v) + ")")
    fg = threshold_scores(scores, opts.threshold, opts.comparison)
    idx = np.flatnonzero(ok)
    meta = {
        "format": FORMAT,
        "bavit_version": __version__,
        "dataset": aset.kind,
        "options": opts.as_dict(),
        "threshold": opts.threshold,
        "comparison": opts.comparison,
        "grid_shape": list(opts.grid.shape),
        "source_sha256": _source_hash(aset.source_files),
        "source_files": [str(p) for p in aset.source_files[:1]] + (
            [f"... {len(aset.source_files)} files"] if len(aset.source_files) > 1 else []),
        "images_dir": str(aset.images_dir) if aset.images_dir else None,
        "categories": {str(k): v for k, v in aset.categories.items()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if extra_meta:
        meta.update(extra_meta)
    write_labels(
        out,
        image_ids=aset.image_ids[idx],
        file_names=[aset.file_names[i] for i in idx],
        widths=aset.widths[idx],
        heights=aset.heights[idx],
        grids=fg[idx],
        scores=scores[idx],
        n_objects=n_obj[idx],
        meta=meta,
    )
    frac = fg[idx].reshape(len(idx), -1).mean(axis=1)
    return LabelSummary(
        out=Path(out),
        images_listed=aset.images_listed,
        images_labelled=int(len(idx)),
        annotations_used=used,
        skipped={k: int(v) for k, v in skipped.items() if v},
        notes={k: int(v) for k, v in aset.notes.items() if v},
        fg_fraction_mean=float(frac.mean()),
        fg_fraction_median=float(np.median(frac)),
        seconds=time.perf_counter() - t0,
    )


def _source_hash(files: list[Path]) -> str:
    if len(files) == 1:
        return sha256_file(files[0])
    digests = "".join(f"{p.name}:{sha256_file(p)}\n" for p in files)
    return sha256_bytes(digests.encode())
