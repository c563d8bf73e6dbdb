"""Running exported graphs in ONNX Runtime: the optional-extra check, sessions, and
:class:`ExportedModels`, which stands in for BAViT and the pruned YOLOS in prune-eval
(``--runtime onnx``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from ..runtime.errors import BavitError, InputFileError, OptionError
from ..runtime.fileio import sha256_file

EXTRA_HINT = "pip install -e \".[onnx]\" in a clone, or pip install 'bavit[onnx]' (onnx and onnxruntime)"
MANIFEST = "manifest.json"
FORMAT = "bavit-export/1"


def require_onnx():
    """Import onnx and onnxruntime, or say which extra to install, in one line."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise BavitError(f"ONNX export and --runtime onnx need the [onnx] extra ({exc.name} is missing): "
                         f"{EXTRA_HINT}") from None
    return onnx, onnxruntime


def providers(device: str = "cpu") -> list[str]:
    """CUDA provider first when ``device`` is CUDA and onnxruntime offers it, then CPU."""
    _, ort = require_onnx()
    have = ort.get_available_providers()
    out = ["CUDAExecutionProvider"] if str(device).startswith("cuda") and "CUDAExecutionProvider" in have else []
    return out + ["CPUExecutionProvider"]


def session(path: str | Path, device: str = "cpu", threads: int = 0):
    """An InferenceSession on ``path`` (``threads`` intra-op threads; 0 = onnxruntime's default)."""
    _, ort = require_onnx()
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=providers(device))
    except Exception as exc:  # onnxruntime raises its own exception types
        raise InputFileError(path, f"onnxruntime cannot load the graph ({str(exc).splitlines()[0][:200]})") from None


def read_manifest(exported: str | Path) -> dict:
    d = Path(exported)
    p = d / MANIFEST
    if not d.is_dir():
        raise InputFileError(d, "exported directory not found (run bavit export first)")
    if not p.is_file():
        raise InputFileError(d, f"not a bavit export directory ({MANIFEST} missing)")
    try:
        doc = json.loads(p.read_text())
    except ValueError as exc:
        raise InputFileError(p, f"unreadable manifest ({exc})") from None
    if doc.get("format") != FORMAT:
        raise InputFileError(p, f"unknown manifest format {doc.get('format')!r} (expected {FORMAT})")
    return doc


def _graph_path(exported: Path, manifest: dict, name: str) -> Path:
    g = manifest["graphs"].get(name)
    if g is None:
        raise OptionError(f"{exported} has no {name} graph (export it: see bavit export --help)")
    p = exported / g["file"]
    if not p.is_file():
        raise InputFileError(p, "exported graph missing")
    if sha256_file(p) != g["sha256"]:
        raise InputFileError(p, "graph does not match its manifest hash (modified or replaced after export)")
    return p


class ExportedModels:
    """ONNX Runtime sessions over an export directory, checked against the models they
    stand in for: ``bavit_probs(images_u8)`` → (N, gh, gw) like ``infer_probs``, and
    ``detect(pixel_values, keep)`` → (logits, boxes) like ``pruned_forward``."""

    def __init__(self, exported: str | Path, detector=None, detector_size=None, bavit=None, device: str = "cpu",
                 threads: int = 0):
        from .onnx_export import state_sha256

        self.dir = Path(exported)
        self.manifest = m = read_manifest(self.dir)
        dm = m["detector"]
        if detector is not None and state_sha256(detector) != dm["weights_sha256"]:
            raise OptionError(f"--exported {self.dir} was made from another detector (its weights differ from --detector)")
        if detector_size is not None and list(detector_size) != list(dm["input_size"]):
            raise OptionError(f"--detector-size {detector_size[0]}x{detector_size[1]} differs from the exported graphs' "
                              f"{dm['input_size'][0]}x{dm['input_size'][1]}")
        if bavit is not None:
            if m.get("bavit") is None:
                raise OptionError(f"--exported {self.dir} holds no bavit.onnx (exported without --model)")
            if state_sha256(bavit) != m["bavit"]["weights_sha256"]:
                raise OptionError(f"--exported {self.dir} was made from another BAViT (its weights differ from --model)")
        self.grid = tuple(dm["grid"])
        self.n_patches = self.grid[0] * self.grid[1]
        self.det = session(_graph_path(self.dir, m, "detector"), device, threads)
        self.dense = session(_graph_path(self.dir, m, "detector_dense"), device, threads) if "detector_dense" in m["graphs"] else None
        self.bavit = session(_graph_path(self.dir, m, "bavit"), device, threads) if "bavit" in m["graphs"] else None

    def bavit_probs(self, images_u8: np.ndarray, batch_size: int = 32,
                    progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """FG probabilities (N, gh, gw) float32 for resized uint8 images (N, h, w, 3)."""
        if self.bavit is None:
            raise OptionError(f"{self.dir} holds no bavit.onnx (exported without --model)")
        b = self.manifest["bavit"]
        mean, std = _norm(b["normalisation"])
        out = []
        for s in range(0, len(images_u8), batch_size):
            x = _normalise(images_u8[s:s + batch_size], mean, std)
            out.append(self.bavit.run(None, {"image": x})[0].astype(np.float32))
            if progress:
                progress(len(x), len(images_u8))
        return np.concatenate(out) if out else np.zeros((0, *b["grid"]), np.float32)

    def detect(self, pixel_values, keep=None):
        """Detector outputs for a batch (B, 3, H, W) with ``keep`` (B, gh, gw) bool or None
        (dense). Images run one at a time through detector.onnx (each keeps its own K);
        dense batches through detector_dense.onnx when exported. Returns torch tensors."""
        import torch

        x = np.ascontiguousarray(_numpy(pixel_values), dtype=np.float32)
        if keep is None and self.dense is not None:
            logits, boxes = self.dense.run(None, {"pixel_values": x})
            return torch.from_numpy(logits), torch.from_numpy(boxes)
        keep = None if keep is None else _numpy(keep).reshape(len(x), -1)
        outs = []
        for i in range(len(x)):
            idx = np.arange(self.n_patches) if keep is None else np.flatnonzero(keep[i])
            outs.append(self.det.run(None, {"pixel_values": x[i:i + 1], "keep": idx.astype(np.int64)}))
        return (torch.from_numpy(np.concatenate([o[0] for o in outs])),
                torch.from_numpy(np.concatenate([o[1] for o in outs])))


def _numpy(t):
    return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)


def _norm(doc: dict):
    return np.asarray(doc["mean"], np.float32), np.asarray(doc["std"], np.float32)


def _normalise(batch_u8: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(B, h, w, 3) uint8 → (B, 3, h, w) float32: x / 255, minus mean, over std (as ``to_input``)."""
    x = np.asarray(batch_u8).transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray((x - mean[None, :, None, None]) / std[None, :, None, None])
