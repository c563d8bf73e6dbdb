"""An operating point of the pruned detector: which patch tokens it computes per image.

One definition for ``bavit detect``, :class:`~bavit_core.detect.predictor.PrunedDetector`
and every BAViT row of prune-eval's sweep:

* ``threshold`` T — BAViT's FG probabilities resampled to the detector grid; a token is kept
  when its BG probability 1 - p_fg < T (optionally after post-processing steps);
* ``sparsity`` S with policy ``topk`` — every image keeps its ceil((1 - S)·P) most likely FG
  tokens (no calibration);
* ``sparsity`` S with policy ``threshold`` — one global threshold placed so that the mean
  sparsity over a set of images is S: over the images being evaluated (prune-eval, exactly
  S with ties broken pseudo-randomly), or calibrated once on a set the user names and then
  applied as a fixed ``threshold`` to any image (:meth:`OperatingPoint.calibrated`);
* no BAViT (``dense``) — every token;
* a trained token gate inside the detector (``gate_layer`` k, ``bavit finetune
  --train-gate``): k layers run dense, then the gate's drop probability 1 − σ(z) of each
  patch token plays BAViT's BG probability — ``threshold`` T prunes a token when it is at
  least T (0.5: the gate's own decision, per image), ``sparsity`` S keeps each image's top
  ceil((1 − S)·P) (``topk`` only: the tokens are chosen inside the forward, so there is no
  set-wide threshold to place). Its tokens come from
  :func:`~bavit_core.detection.layered.layered_forward`, not :meth:`OperatingPoint.select`.

``treatment`` says what happens to the pruned tokens (detection/pruned.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from ..detection.pruned import TREATMENTS
from ..detection.selection import (POLICIES, bavit_keep, bavit_priority, dense_keep, select_target)
from ..runtime.errors import OptionError


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float | None = None  # BG-probability threshold (given, or calibrated)
    sparsity: float | None = None  # target mean sparsity
    policy: str = "threshold"  # how a sparsity is reached: threshold (global) or topk (per image)
    treatment: str = "drop"  # what happens to the pruned tokens
    dense: bool = False  # no BAViT: every token
    gate_layer: int | None = None  # a trained gate after this many detector layers chooses the tokens

    def check(self) -> "OperatingPoint":
        """Refuse inconsistent or out-of-range values (one OptionError naming the option)."""
        if self.policy not in POLICIES:
            raise OptionError(f"unknown --policy {self.policy!r}; choose {' or '.join(POLICIES)}")
        if self.treatment not in TREATMENTS:
            raise OptionError(f"unknown --pruned-tokens {self.treatment!r}; choose {', '.join(TREATMENTS)}")
        if self.dense:
            if self.gate_layer is not None:
                raise OptionError("a gate point is not dense: give dense=False")
            if self.threshold is not None or self.sparsity is not None:
                raise OptionError("--threshold and --sparsity choose BAViT's tokens: they need --model RUN")
            return self
        if self.gate_layer is not None and self.policy == "threshold" and self.sparsity is not None:
            raise OptionError("--gate reaches a --sparsity in every image (--policy topk) only: "
                              "drop --policy threshold and --calibrate-on, or give --threshold T")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise OptionError(f"--threshold must lie in [0, 1]; got {self.threshold}")
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
            raise OptionError(f"--sparsity must lie in [0, 1); got {self.sparsity}")
        if self.policy == "topk":
            if self.sparsity is None:
                raise OptionError("--policy topk needs --sparsity")
            if self.threshold is not None:
                raise OptionError("--threshold goes with --policy threshold, not topk")
        if self.threshold is None and self.sparsity is None:
            raise OptionError("give an operating point: --threshold T or --sparsity S")
        return self

    @property
    def needs_calibration(self) -> bool:
        """A target sparsity under the threshold policy, not yet turned into a threshold."""
        return not self.dense and self.gate_layer is None and self.policy == "threshold" and \
            self.sparsity is not None and self.threshold is None

    @property
    def gate(self) -> bool:
        """The tokens are chosen by a trained gate inside the detector."""
        return self.gate_layer is not None

    def describe(self) -> str:
        if self.dense:
            return "dense (every token)"
        t = "" if self.treatment == "drop" else f", pruned tokens {self.treatment}"
        if self.gate:
            g = f"gate after layer {self.gate_layer}: "
            if self.sparsity is not None:
                return f"{g}sparsity {self.sparsity:g} per image (topk){t}"
            own = " (its own decision)" if self.threshold == 0.5 else ""
            return f"{g}drop-probability threshold {self.threshold:g}{own}{t}"
        if self.policy == "topk":
            return f"sparsity {self.sparsity:g} per image (topk){t}"
        if self.sparsity is not None:
            return f"sparsity {self.sparsity:g} (threshold {self.threshold:.6g}, calibrated){t}"
        return f"BG-probability threshold {self.threshold:g}{t}"

    def as_dict(self) -> dict:
        d = {"threshold": self.threshold, "sparsity": self.sparsity, "policy": self.policy,
             "treatment": self.treatment, "dense": self.dense, "description": self.describe()}
        if self.gate:  # (only then: BAViT points keep the keys earlier detect.json files hold)
            d.update(selector="gate", gate_layer=self.gate_layer)
        return d

    def select(self, probs, grid, resample: str = "nearest", postprocess_steps: int = 0, seed=0,
               n: int | None = None):
        """Kept tokens of a set of images on the detector grid(s) (``grid``: one (gh, gw), or
        one per image as an (N, 2) array) from BAViT's FG probabilities ``probs`` (N, bh, bw;
        None when dense, then ``n`` says how many images). Returns (keep, threshold): the BG-probability threshold applied, or
        reached over this set for a threshold-policy sparsity not yet calibrated (NaN for
        topk and dense)."""
        nan = float("nan")
        if self.gate:
            raise OptionError("a gate's tokens are chosen inside the detector's forward "
                              "(PrunedDetector runs it), not from BAViT's probabilities")
        if self.dense:  # ``n`` images (default: as many as probs or grids)
            n = n if n is not None else len(probs) if probs is not None else len(grid)
            return dense_keep(n, grid), nan
        if probs is None:
            raise OptionError("this operating point needs BAViT's probabilities (--model RUN)")
        if self.policy == "threshold" and self.threshold is not None:
            return bavit_keep(probs, self.threshold, grid, resample, postprocess_steps), float(self.threshold)
        if postprocess_steps:
            raise OptionError("--postprocess-steps works with a threshold only (a target sparsity ranks "
                              "BAViT's probabilities directly)")
        keep, p_min = select_target(bavit_priority(probs, grid, resample), self.sparsity, self.policy, seed=seed)
        return keep, (1.0 - p_min if self.policy == "threshold" else nan)

    def calibrated(self, probs, grid, resample: str = "nearest", seed=0) -> "OperatingPoint":
        """This threshold-policy sparsity as a fixed threshold, placed on the calibration set's
        BAViT probabilities ``probs`` (its images' detector grids ``grid``): the set's tokens
        are ranked together as prune-eval ranks its images (:func:`select_target`), and the
        threshold keeps every token at least as likely FG as the last one kept (so on the
        calibration set itself the kept tokens are prune-eval's, ties at the boundary all kept)."""
        if not self.needs_calibration:
            return self
        _, reached = self.select(probs, grid, resample, seed=seed)
        if math.isnan(reached):
            raise OptionError("the calibration set has no images")
        # kept when 1 - p < threshold: the smallest threshold above the last kept token's 1 - p
        return replace(self, threshold=float(np.nextafter(reached, np.inf)))
