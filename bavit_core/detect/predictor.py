""":class:`PrunedDetector`: YOLOS computing only the tokens BAViT keeps (or its own trained
token gate keeps), at one operating point, on any images — the library behind ``bavit
detect`` and the forward prune-eval's sweep runs for each of its rows (so the three cannot
drift apart).

    >>> det = PrunedDetector.load(model="runs/bavit-small", detector="hustvl/yolos-tiny", sparsity=0.35)
    >>> [r] = det(["photo.jpg"])
    >>> r.boxes, r.names, r.scores, r.keep.mean(), r.detector_ms
    >>> gated = PrunedDetector.load(detector="runs/gated", gate=True)  # bavit finetune --train-gate's output

Images go through the detector's input protocol (its own processor by default, or a
square size) and BAViT's input size exactly as prune-eval decodes a dataset; BAViT's FG
probabilities become kept tokens by :class:`~bavit_core.detect.point.OperatingPoint`; the
pruned forward is :func:`~bavit_core.detection.pruned.pruned_forward` (or the exported
graphs in ONNX Runtime). With ``gate=True`` no BAViT runs: the gate saved beside the
detector (``gate.json``, ``gate.safetensors``) scores the patch tokens after its layer k
inside :func:`~bavit_core.detection.layered.layered_forward` — the forward prune-eval's
``gate`` rows run. Detections are the detection tokens' best class and box in the
original image's pixels (the same arithmetic as transformers' post-processing).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..bavit.inference import infer_probs
from ..data.ragged import Grids
from ..detection.cocoeval import detections_from_outputs
from ..detection.pruned import pruned_forward
from ..detection.selection import sparsity_stats
from ..detection.batches import autocast_args, batch_inputs
from ..runtime.errors import OptionError
from .point import OperatingPoint
from .sources import to_inputs

DEFAULT_DETECTOR = "hustvl/yolos-tiny"


@dataclass
class ImageDetections:
    """One image's result. ``boxes`` (K, 4) x0, y0, x1, y1 in the original image's pixels,
    ``labels`` the detector's label ids, ``names`` their names, ``scores`` (K,), best first;
    ``keep`` (gh, gw) the tokens the detector computed on its grid; ``size`` the original
    (h, w) and ``input_size`` the detector input's (H, W); per-image milliseconds (its share
    of its batch's wall time). With a trained gate (``PrunedDetector.load(gate=True)``)
    ``keep`` is the gate's choice after its layer k (the first k layers still ran on every
    token), ``bavit_ms`` is 0 and the gate's cost is folded into ``detector_ms``: it runs
    inside the detector's forward."""
    boxes: np.ndarray
    labels: np.ndarray
    names: list
    scores: np.ndarray
    keep: np.ndarray
    size: tuple
    input_size: tuple
    bavit_ms: float
    detector_ms: float
    patch: int = 16  # the detector's patch size (a grid cell's side in input pixels)

    @property
    def tokens(self) -> int:
        return int(self.keep.size)

    @property
    def kept(self) -> int:
        return int(self.keep.sum())

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / self.tokens

    def to_coco(self, image_id: int, file_name: str | None = None) -> list[dict]:
        """COCO results entries (bbox x, y, width, height), with ``file_name`` when given."""
        out = []
        for b, c, s in zip(self.boxes.tolist(), self.labels.tolist(), self.scores.tolist()):
            d = {"image_id": int(image_id), "category_id": int(c), "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                 "score": float(s)}
            if file_name is not None:
                d["file_name"] = file_name
            out.append(d)
        return out


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PrunedDetector:
    """A YOLOS detector with BAViT's token selection at one operating point (``point``).
    Build it with :meth:`load`; call it on images. ``bavit`` None: the dense detector, or,
    with ``gate`` (a :class:`~bavit_core.detection.gate.TokenGate`) and a gate ``point``,
    the detector choosing its own tokens after the gate's layer."""

    def __init__(self, detector, bavit=None, protocol=None, point: OperatingPoint | None = None, *,
                 device=None, dtype=torch.float32, layout: str | None = None, batch_size: int = 8,
                 resample: str = "nearest", postprocess_steps: int = 0, seed: int = 0, onnx=None,
                 score_threshold: float = 0.5, gate=None, gate_info: dict | None = None):
        self.detector, self.bavit, self.protocol = detector, bavit, protocol
        self.point = (point or OperatingPoint(dense=bavit is None)).check()
        if self.point.gate:
            if gate is None:
                raise OptionError("a gate operating point needs the gate (PrunedDetector.load(..., gate=True))")
            if gate.layer != self.point.gate_layer:
                raise OptionError(f"the gate reads layer {gate.layer}, the operating point says "
                                  f"{self.point.gate_layer}")
            if onnx is not None:
                raise OptionError("--runtime onnx runs the exported graphs, which hold no gate: use --runtime torch")
        elif not self.point.dense and bavit is None and onnx is None:
            raise OptionError("this operating point needs a BAViT model (--model RUN)")
        self.gate, self.gate_info = gate, gate_info
        self.device = torch.device(device) if device is not None else next(detector.parameters()).device
        self.dtype = dtype
        self.layout = layout or ("pad" if self.device.type == "cuda" else "pack")
        self.batch_size, self.resample, self.postprocess_steps, self.seed = batch_size, resample, postprocess_steps, seed
        self.onnx = onnx
        self.score_threshold = score_threshold
        self.calibration: dict | None = None
        cfg = detector.config
        self.patch = cfg.patch_size
        self.id2label = {int(k): str(v) for k, v in cfg.id2label.items()}

    # ------------------------------------------------------------------ building
    @classmethod
    def load(cls, model: str | Path | None = None, detector: str = DEFAULT_DETECTOR, *, threshold: float | None = None,
             sparsity: float | None = None, policy: str | None = None, calibrate_on=None, pruned_tokens: str = "drop",
             detector_size: tuple[int, int] | None = None, runtime: str = "torch", exported: str | Path | None = None,
             device: str = "auto", batch_size: int = 8, score_threshold: float = 0.5, resample: str = "nearest",
             seed: int = 0, progress: Callable[[int, int], None] | None = None,
             gate: bool = False) -> "PrunedDetector":
        """Load the detector (hub name or directory) and, with ``model`` (a BAViT run
        directory), BAViT; the operating point is ``threshold`` (BG probability; default 0.5,
        BAViT's own decision), or ``sparsity`` with ``policy`` ``topk`` (default) or
        ``threshold`` (then calibrated on ``calibrate_on``: paths, folders or patterns, or a
        list of images). ``runtime="onnx"`` runs the graphs ``bavit export`` wrote to
        ``exported`` in ONNX Runtime (square protocol at their size, ``drop`` only).

        ``gate=True`` (instead of ``model``): the token gate saved beside ``detector`` (a
        directory from ``bavit finetune --train-gate``) chooses the tokens after its layer;
        ``threshold`` is then its drop probability 1 − σ(z) at which a token is pruned
        (default 0.5: the gate's own decision, a different share per image) and
        ``sparsity`` keeps every image's top share (topk only: no ``calibrate_on``).
        ``bavit_ms`` is 0 and the gate's cost is part of ``detector_ms``. PyTorch only."""
        from ..bavit.model import load_bavit
        from ..detection.gate import has_gate, gate_info, load_gate
        from ..detection.protocol import input_protocol
        from ..detection.yolos import load_detector
        from ..runtime.devices import resolve_device
        from ..runtime.fileio import sha256_file
        from ..runtime.options import check_option_values

        check_option_values(device, {"runtime": (runtime, ("torch", "onnx")), "resample": (resample, ("nearest", "any"))},
                            batch_size=(batch_size, 1))
        info = None
        if gate:  # one selector at a time; the gate runs in PyTorch only, reaching a target per image
            if model is not None:
                raise OptionError("--gate and --model are two token selectors: give one (the gate beside "
                                  "--detector, or a BAViT run)")
            if runtime == "onnx":
                raise OptionError("--runtime onnx runs exported graphs, and bavit export writes no gate graph: "
                                  "run --gate with --runtime torch")
            if calibrate_on is not None or (policy == "threshold" and sparsity is not None):
                raise OptionError("--gate reaches a --sparsity in every image (--policy topk) only: "
                                  "drop --policy threshold and --calibrate-on, or give --threshold T")
            if not has_gate(detector):
                raise OptionError(f"--gate uses the gate beside --detector, and {detector} has none (no gate.json); "
                                  "train one with bavit finetune --train-gate")
            info = gate_info(detector)
        if policy is None:
            policy = "threshold" if calibrate_on is not None or sparsity is None else "topk"
        if (model is not None or gate) and threshold is None and sparsity is None:
            threshold = 0.5
        point = OperatingPoint(threshold, sparsity, policy, pruned_tokens, dense=model is None and not gate,
                               gate_layer=info["layer"] if gate else None).check()
        if calibrate_on is not None and not point.needs_calibration:
            raise OptionError("--calibrate-on places the threshold for a --sparsity under --policy threshold; "
                              "this operating point needs no calibration")
        if point.needs_calibration and calibrate_on is None:
            raise OptionError("--sparsity with --policy threshold needs a calibration set (--calibrate-on IMAGES) "
                              "to place its threshold; or use --policy topk")
        if not 0.0 <= score_threshold <= 1.0:
            raise OptionError(f"--score-threshold must lie in [0, 1]; got {score_threshold}")
        if runtime == "torch" and exported is not None:
            raise OptionError("--exported goes with --runtime onnx")
        if runtime == "onnx":
            if exported is None:
                raise OptionError("--runtime onnx needs --exported DIR (from bavit export)")
            if pruned_tokens != "drop":
                raise OptionError("--runtime onnx runs the exported graphs, which drop pruned tokens: "
                                  "use --pruned-tokens drop")
        dev = resolve_device(device)
        det = load_detector(detector, dev)
        onnx = None
        size = tuple(detector_size) if detector_size else None
        if runtime == "onnx":
            from ..export.ort import read_manifest

            size = size or tuple(read_manifest(exported)["detector"]["input_size"])
        proto = input_protocol(detector, size, det.config.patch_size)
        bavit = load_bavit(model, device=dev) if model is not None else None
        token_gate = None
        if gate:  # checked against the detector: its width, its layer count
            token_gate = load_gate(detector, det.config, dev)
            weights = Path(detector) / "gate.safetensors"
            info = {**info, "trained_from": info.get("detector"), "detector": str(detector),
                    "sha256": sha256_file(weights)}
        if runtime == "onnx":
            from ..export.ort import ExportedModels

            onnx = ExportedModels(exported, det, proto.size, bavit, str(dev))
        self = cls(det, bavit, proto, point, device=dev, batch_size=batch_size, resample=resample, seed=seed,
                   onnx=onnx, score_threshold=score_threshold, gate=token_gate, gate_info=info)
        if point.needs_calibration:
            self.calibrate(calibrate_on, progress)
        return self

    def with_point(self, point: OperatingPoint) -> "PrunedDetector":
        """The same models at another operating point."""
        other = object.__new__(PrunedDetector)
        other.__dict__.update(self.__dict__)
        other.point = point.check()
        other.calibration = None
        return other

    # ------------------------------------------------------------------ the pieces
    @property
    def bavit_size(self) -> tuple[int, int] | None:
        return (self.bavit.cfg.input_h, self.bavit.cfg.input_w) if self.bavit is not None else None

    def grids(self, det_u8) -> tuple | np.ndarray:
        """The detector grid of decoded inputs: one (gh, gw) under a square protocol, else
        one per image ((N, 2))."""
        ps = self.patch
        if self.protocol is not None and self.protocol.size is not None:
            return self.protocol.size[0] // ps, self.protocol.size[1] // ps
        return np.array([(np.shape(a)[0] // ps, np.shape(a)[1] // ps) for a in det_u8], dtype=np.int64).reshape(-1, 2)

    def bavit_probs(self, bavit_u8, progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """BAViT's FG probabilities (N, bh, bw) of BAViT-sized uint8 inputs (N, h, w, 3)."""
        if self.onnx is not None:
            return self.onnx.bavit_probs(bavit_u8, self.batch_size, progress)
        return infer_probs(self.bavit, bavit_u8, self.batch_size, self.device, progress)

    def select(self, probs, grid, n: int | None = None):
        """(keep, threshold) of this operating point (see OperatingPoint.select)."""
        return self.point.select(probs, grid, self.resample, self.postprocess_steps, seed=[self.seed, 1], n=n)

    def forward(self, det_u8, keep, sl: slice, treatment: str | None = None):
        """The detector on images ``sl`` of the decoded inputs ``det_u8`` with kept tokens
        ``keep`` (the whole set's selection, or None: dense) → (logits, boxes)."""
        x, k = batch_inputs(det_u8, keep, sl, self.protocol, self.device, self.dtype)
        if self.onnx is not None:
            return self.onnx.detect(x, k)
        with torch.inference_mode(), torch.autocast(**autocast_args(self.device, self.dtype)):
            out = pruned_forward(self.detector, x, k, layout=self.layout, treatment=treatment or self.point.treatment)
        return out.logits, out.pred_boxes

    def detect_decoded(self, det_u8, keep, ids, widths, heights, progress: Callable[[int], None] | None = None,
                       treatment: str | None = None) -> list[dict]:
        """COCO result dicts of every detection token of every decoded image, in batches
        (prune-eval's detections of one row; ``keep`` None: dense)."""
        out = []
        n = len(det_u8)
        for s in range(0, n, self.batch_size):
            sl = slice(s, min(s + self.batch_size, n))
            logits, boxes = self.forward(det_u8, keep, sl, treatment)
            out += detections_from_outputs(logits, boxes, ids[sl], widths[sl], heights[sl])
            if progress:
                progress(sl.stop - sl.start)
        return out

    def detect_decoded_layered(self, det_u8, layer: int, sparsity: float, ids, widths, heights,
                               progress: Callable[[int], None] | None = None,
                               treatment: str | None = None, gate=None,
                               threshold: float | None = None) -> tuple[list[dict], list[np.ndarray]]:
        """As :meth:`detect_decoded` for a detector that keeps its own tokens after ``layer``
        layers (detection/layered.py): by its attention at target ``sparsity`` (topk), or by
        a trained ``gate`` at that target or at a drop-probability ``threshold`` (then
        ``sparsity`` is NaN). The COCO result dicts and every image's kept tokens ((P_i,)
        bool, row-major)."""
        out, keeps = [], []
        n = len(det_u8)
        for s in range(0, n, self.batch_size):
            sl = slice(s, min(s + self.batch_size, n))
            logits, boxes, k = self.forward_layered(det_u8, sl, layer, sparsity, treatment, gate, threshold)
            out += detections_from_outputs(logits, boxes, ids[sl], widths[sl], heights[sl])
            keeps += k
            if progress:
                progress(sl.stop - sl.start)
        return out, keeps

    def forward_layered(self, det_u8, sl: slice, layer: int, sparsity: float | None = None,
                        treatment: str | None = None, gate=None, threshold: float | None = None):
        """The detector on images ``sl`` of ``det_u8`` choosing its own tokens after ``layer``
        layers (:meth:`detect_decoded_layered`; ``bavit detect --gate`` and prune-eval's
        gate rows both come here) → (logits, boxes, kept tokens per image ((P_i,) bool))."""
        from ..detection.layered import layered_forward

        x, _ = batch_inputs(det_u8, None, sl, self.protocol, self.device, self.dtype)
        with torch.inference_mode(), torch.autocast(**autocast_args(self.device, self.dtype)):
            r = layered_forward(self.detector, x, layer, sparsity=None if threshold is not None else sparsity,
                                layout=self.layout, treatment=treatment or self.point.treatment, gate=gate,
                                threshold=threshold)
        return r.logits, r.pred_boxes, [k.cpu().numpy() for k in r.keep]

    # ------------------------------------------------------------------ calibration
    def calibrate(self, images, progress: Callable[[int, int], None] | None = None) -> "PrunedDetector":
        """Place a threshold-policy sparsity's threshold on ``images`` (paths, folders,
        patterns, PIL images or arrays): after this the point is a fixed threshold."""
        from .sources import find_images

        if not self.point.needs_calibration:
            return self
        if isinstance(images, (str, Path)):
            images = [images]
        if all(isinstance(i, (str, Path)) for i in images):
            images = [s.path for s in find_images(images)]
        dets, bavs = [], []
        for im in images:
            d, b, _ = to_inputs(im, self.protocol.prepare, self.bavit_size)
            dets.append(np.broadcast_to(np.uint8(0), d.shape))  # only its size is needed: its grid
            bavs.append(b)
            if progress:
                progress(1, len(images))
        if not dets:
            raise OptionError("--calibrate-on holds no images")
        probs = self.bavit_probs(np.stack(bavs))
        grid = self.grids(dets)
        self.point = self.point.calibrated(probs, grid, self.resample, seed=[self.seed, 1])
        keep, _ = self.select(probs, grid)
        self.calibration = {"images": len(dets), "target": self.point.sparsity, "threshold": self.point.threshold,
                            "sparsity_reached": sparsity_stats(keep)["sparsity"]}
        return self

    # ------------------------------------------------------------------ images → detections
    def __call__(self, images: Sequence, score_threshold: float | None = None) -> list[ImageDetections]:
        """Detections of each image (a path, a PIL image or an (H, W, 3) uint8 array), in
        batches of ``batch_size``; those scoring above ``score_threshold`` (default: this
        detector's) are kept, best first."""
        if isinstance(images, (str, Path)) or hasattr(images, "size") and not isinstance(images, (list, tuple)):
            images = [images]
        out = []
        for s in range(0, len(images), self.batch_size):
            decoded = [to_inputs(im, self.protocol.prepare, self.bavit_size) for im in images[s:s + self.batch_size]]
            out += self.detect_batch(decoded, score_threshold)
        return out

    def detect_batch(self, decoded: list, score_threshold: float | None = None) -> list[ImageDetections]:
        """One batch of decoded images (:func:`~bavit_core.detect.sources.to_inputs`'s
        triples) → their detections."""
        if self.point.needs_calibration:
            raise OptionError("a --sparsity under --policy threshold needs calibrating first: "
                              "PrunedDetector.calibrate(images)")
        thr = self.score_threshold if score_threshold is None else score_threshold
        n = len(decoded)
        if n == 0:
            return []
        det_u8 = [d[0] for d in decoded]
        if self.protocol.size is not None:
            det_u8 = np.stack(det_u8)
        grid = self.grids(det_u8)
        t0 = time.perf_counter()
        if self.point.gate:  # the detector chooses its tokens: no BAViT, the gate's cost is the detector's
            t1 = t0
            _sync(self.device)
            t2 = time.perf_counter()
            logits, boxes, kept = self.forward_layered(det_u8, slice(0, n), self.point.gate_layer,
                                                       self.point.sparsity, gate=self.gate,
                                                       threshold=self.point.threshold)
            _sync(self.device)
            t3 = time.perf_counter()
            shapes = [grid] * n if isinstance(grid, tuple) else [tuple(g) for g in grid]
            grids = [k.reshape(s) for k, s in zip(kept, shapes)]
        else:
            probs = self.bavit_probs(np.stack([d[1] for d in decoded])) if not self.point.dense else None
            t1 = time.perf_counter()
            keep, _ = self.select(probs, grid, n=n)
            _sync(self.device)
            t2 = time.perf_counter()
            logits, boxes = self.forward(det_u8, None if self.point.dense else keep, slice(0, n))
            _sync(self.device)
            t3 = time.perf_counter()
            grids = Grids.of(keep)
        hw = [d[2] for d in decoded]
        dets = detections_from_outputs(logits, boxes, range(n), [w for _, w in hw], [h for h, _ in hw])
        per = len(dets) // n
        out = []
        for i in range(n):
            mine = [d for d in dets[i * per:(i + 1) * per] if d["score"] > thr]
            mine.sort(key=lambda d: -d["score"])
            xywh = np.array([d["bbox"] for d in mine], dtype=np.float64).reshape(-1, 4)
            labels = np.array([d["category_id"] for d in mine], dtype=np.int64)
            out.append(ImageDetections(
                boxes=np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
                labels=labels, names=[self.id2label.get(int(c), str(c)) for c in labels],
                scores=np.array([d["score"] for d in mine], dtype=np.float64), keep=np.array(grids[i], dtype=bool),
                size=tuple(hw[i]), input_size=tuple(np.shape(det_u8[i])[:2]),
                bavit_ms=1000 * (t1 - t0) / n, detector_ms=1000 * (t3 - t2) / n, patch=self.patch))
        return out

    def describe(self) -> dict:
        """What this detector runs: operating point, protocol, runtime (for outputs' metadata);
        ``gate``: the trained gate's record (its gate.json — ``layer``, ``target_sparsity``
        it was trained for, … — with its directory and weights' sha256), None without one."""
        return {"operating_point": self.point.as_dict(), "input_protocol": self.protocol.as_dict(),
                "runtime": "onnx" if self.onnx is not None else "torch", "layout": self.layout,
                "resample": self.resample, "calibration": self.calibration,
                "bavit_input_size": list(self.bavit_size) if self.bavit_size else None,
                "gate": self.gate_info if self.point.gate else None}


__all__ = ["DEFAULT_DETECTOR", "ImageDetections", "OperatingPoint", "PrunedDetector"]
