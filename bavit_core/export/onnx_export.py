"""``bavit export``: write bavit.onnx, detector.onnx (pruned YOLOS with dynamic K),
optionally detector_dense.onnx, and pipeline.onnx, each checked in ONNX Runtime against
PyTorch, with a manifest.json describing inputs, outputs, normalisation, grids, the token
decision, versions and hashes."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import __version__
from ..detection.pruned import pruned_forward
from ..detection.selection import kept_per_image
from ..detection.protocol import square_protocol
from ..detection.yolos import detector_grid, load_detector
from ..detection.treatments import EXPORTED_TREATMENTS, get_treatment
from ..runtime.errors import BavitError, InputFileError, OptionError
from ..runtime.fileio import atomic_write_text, check_output_writable, sha256_file
from .graphs import POLICIES, BavitProbs, DenseDetector, Pipeline, PrunedDetectorGraph, reference_keep
from .ort import FORMAT, MANIFEST, require_onnx, session

OPSETS = (7, 20)  # torch's TorchScript exporter; bavit.onnx needs 14 (SDPA in timm's attention)
TOLERANCE = 1e-4
GRAPH_FILES = ("detector.onnx", "detector_dense.onnx", "bavit.onnx", "pipeline.onnx")


@dataclass
class ExportOptions:
    detector: str
    out: str
    model: str | None = None
    detector_size: tuple[int, int] | None = None  # None: square_protocol's default
    threshold: float | None = None
    sparsity: float | None = None
    policy: str = "threshold"
    pruned_tokens: str = "drop"
    dense: bool = False
    opset: int = 17
    seed: int = 0


def state_sha256(module: torch.nn.Module) -> str:
    """Hash of a module's weights (names, shapes, fp32 values in name order): the same for a
    model whatever file format or precision it was stored in."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        t = v.detach().cpu().contiguous()
        t = t.float() if t.is_floating_point() else t
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def check_options(opts: ExportOptions) -> None:
    get_treatment(opts.pruned_tokens)
    if opts.pruned_tokens not in EXPORTED_TREATMENTS:
        raise OptionError(f"--pruned-tokens {opts.pruned_tokens} is not exported yet (only drop); "
                          "pool and preserve run in prune-eval's PyTorch forward")
    if not OPSETS[0] <= opts.opset <= OPSETS[1]:
        raise OptionError(f"--opset {opts.opset} is outside what the exporter supports ({OPSETS[0]}..{OPSETS[1]})")
    if opts.policy not in POLICIES:
        raise OptionError(f"unknown --policy {opts.policy!r}; choose one of {', '.join(POLICIES)}")
    if opts.model is None:
        if opts.threshold is not None or opts.sparsity is not None or opts.policy != "threshold":
            raise OptionError("--threshold, --sparsity and --policy set pipeline.onnx's token decision: they need --model")
        return
    if opts.threshold is not None and not 0.0 <= opts.threshold <= 1.0:
        raise OptionError(f"--threshold must lie in [0, 1]; got {opts.threshold}")
    if opts.sparsity is not None and not 0.0 <= opts.sparsity < 1.0:
        raise OptionError(f"--sparsity must lie in [0, 1); got {opts.sparsity}")
    if opts.policy == "threshold" and opts.sparsity is not None:
        raise OptionError("--sparsity with --policy threshold needs a calibration set to pick the threshold, "
                          "which export does not do: use --policy topk, or give --threshold")
    if opts.policy == "topk":
        if opts.sparsity is None:
            raise OptionError("--policy topk needs --sparsity")
        if opts.threshold is not None:
            raise OptionError("--threshold goes with --policy threshold, not topk")


def grid_summary(det_cfg, det_size, bavit_cfg=None) -> str:
    """One line: the detector's grid and, with BAViT, how its grid maps onto it."""
    dg = (det_size[0] // det_cfg.patch_size, det_size[1] // det_cfg.patch_size)
    line = f"detector {det_size[0]}x{det_size[1]}/{det_cfg.patch_size} → {dg[0]}x{dg[1]} tokens"
    if bavit_cfg is None:
        return line
    bg = bavit_cfg.grid_shape
    how = "same grid" if tuple(bg) == dg else f"nearest-resampled to {dg[0]}x{dg[1]}"
    return (f"BAViT {bavit_cfg.input_h}x{bavit_cfg.input_w}/{bavit_cfg.patch} → {bg[0]}x{bg[1]} tokens, {how}; "
            + line)


def _io(name, shape, dtype="float32"):
    return {"name": name, "shape": list(shape), "dtype": dtype}


def _export(module, args, path: Path, names_in, names_out, dynamic, opset: int) -> None:
    """torch.onnx.export (TorchScript path) to ``path``; exporter failures become
    one-line OptionErrors naming the graph and the opset."""
    with warnings.catch_warnings(), _quiet():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset, input_names=names_in,
                              output_names=names_out, dynamic_axes=dynamic, do_constant_folding=True)
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0][:240] if str(exc).strip() else type(exc).__name__
            raise OptionError(f"cannot export {path.name} at opset {opset}: {msg}") from None


@contextlib.contextmanager
def _quiet():
    """Silence the exporter: on failure its C++ side dumps the whole graph to stderr."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def _readable(path: Path) -> None:
    """A deployable file, readable like any other (temporary files are made 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max()) if np.size(a) else 0.0


def _check(name: str, diffs: dict, scale: dict) -> dict:
    for k, d in diffs.items():
        if d > TOLERANCE * max(1.0, scale.get(k, 1.0)):
            raise BavitError(f"{name}: ONNX Runtime differs from PyTorch by {d:.2e} in {k} (tolerance "
                             f"{TOLERANCE:g})")
    return {k: float(f"{v:.3g}") for k, v in diffs.items()}


def export_onnx(opts: ExportOptions, progress: Callable[[str], None] | None = None) -> dict:
    """Export, verify in ONNX Runtime, write the manifest. Returns a summary dict."""
    require_onnx()
    check_options(opts)
    check_output_writable(opts.out, in_place=True)  # export fills an existing --out in place
    say = progress or (lambda s: None)
    t0 = time.perf_counter()
    det = load_detector(opts.detector)
    proto = square_protocol(opts.detector, tuple(opts.detector_size) if opts.detector_size else None,
                            det.config.patch_size)
    size = proto.size
    dgrid = detector_grid(det, size)
    bavit = None
    if opts.model is not None:
        from ..bavit.model import load_bavit

        bavit = load_bavit(opts.model)
    out = Path(opts.out)
    existed = out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputFileError(out, f"cannot create the output directory ({exc.strerror})") from None
    stage = Path(tempfile.mkdtemp(prefix=".export-", dir=out))  # graphs appear in out only when all passed
    try:
        graphs, verified, selection = _write_graphs(stage, opts, det, size, dgrid, bavit, say)
        for gdoc in graphs.values():
            gdoc["sha256"] = sha256_file(stage / gdoc["file"])
        (out / MANIFEST).unlink(missing_ok=True)
        for name in GRAPH_FILES:
            (out / name).unlink(missing_ok=True)  # none left over from an earlier export into out
        for gdoc in graphs.values():
            _readable(stage / gdoc["file"])
            os.replace(stage / gdoc["file"], out / gdoc["file"])
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if not existed:
            shutil.rmtree(out, ignore_errors=True)  # nothing of this run is left behind
        raise
    shutil.rmtree(stage, ignore_errors=True)
    return _finish(out, opts, det, proto, dgrid, bavit, graphs, verified, selection, t0)


def _write_graphs(stage: Path, opts: ExportOptions, det, size, dgrid, bavit, say):
    """Export every graph into ``stage`` and check each in ONNX Runtime against PyTorch."""
    n_p = dgrid[0] * dgrid[1]
    cfg = det.config
    n_labels = cfg.num_labels + 1
    d = cfg.num_detection_tokens
    g = torch.Generator().manual_seed(opts.seed)
    x = torch.randn(1, 3, *size, generator=g)
    graphs, verified = {}, {}

    say("detector.onnx")
    pruned = PrunedDetectorGraph(det, size).eval()
    k_demo = torch.sort(torch.randperm(n_p, generator=g)[: max(1, n_p // 2)]).values
    _export(pruned, (x, k_demo), stage / "detector.onnx", ["pixel_values", "keep"], ["logits", "boxes"],
            {"keep": {0: "K"}}, opts.opset)
    graphs["detector"] = {"file": "detector.onnx",
                          "inputs": [_io("pixel_values", (1, 3, *size)), _io("keep", ["K"], "int64")],
                          "outputs": [_io("logits", (1, d, n_labels)), _io("boxes", (1, d, 4))]}
    s = session(stage / "detector.onnx")
    diffs = {"logits": 0.0, "boxes": 0.0}
    scale = 0.0
    for k in sorted({n_p, 0, max(1, n_p // 3)}):
        idx = torch.sort(torch.randperm(n_p, generator=g)[:k]).values
        keep = torch.zeros(1, n_p, dtype=torch.bool)
        keep[0, idx] = True
        with torch.no_grad():
            ref = pruned_forward(det, x, keep)
        lo, bo = s.run(None, {"pixel_values": x.numpy(), "keep": idx.numpy().astype(np.int64)})
        diffs = {"logits": max(diffs["logits"], _max_diff(lo, ref.logits)),
                 "boxes": max(diffs["boxes"], _max_diff(bo, ref.pred_boxes))}
        scale = max(scale, float(ref.logits.abs().max()))
    verified["detector"] = _check("detector.onnx", diffs, {"logits": scale})

    if opts.dense:
        say("detector_dense.onnx")
        dense = DenseDetector(det, size).eval()
        _export(dense, (x,), stage / "detector_dense.onnx", ["pixel_values"], ["logits", "boxes"],
                {"pixel_values": {0: "N"}, "logits": {0: "N"}, "boxes": {0: "N"}}, opts.opset)
        graphs["detector_dense"] = {"file": "detector_dense.onnx", "inputs": [_io("pixel_values", ("N", 3, *size))],
                                    "outputs": [_io("logits", ("N", d, n_labels)), _io("boxes", ("N", d, 4))]}
        xb = torch.randn(2, 3, *size, generator=g)
        with torch.no_grad():
            ref = det(pixel_values=xb)
        lo, bo = session(stage / "detector_dense.onnx").run(None, {"pixel_values": xb.numpy()})
        verified["detector_dense"] = _check("detector_dense.onnx", {"logits": _max_diff(lo, ref.logits),
                                            "boxes": _max_diff(bo, ref.pred_boxes)},
                                            {"logits": float(ref.logits.abs().max())})

    selection = None
    if bavit is not None:
        bc = bavit.cfg
        bsize, bgrid = (bc.input_h, bc.input_w), bc.grid_shape
        say("bavit.onnx")
        xb = torch.randn(2, 3, *bsize, generator=g)
        _export(BavitProbs(bavit).eval(), (xb,), stage / "bavit.onnx", ["image"], ["fg_prob"],
                {"image": {0: "N"}, "fg_prob": {0: "N"}}, opts.opset)
        graphs["bavit"] = {"file": "bavit.onnx", "inputs": [_io("image", ("N", 3, *bsize))],
                           "outputs": [_io("fg_prob", ("N", *bgrid))]}
        with torch.no_grad():
            ref = bavit.fg_prob(xb)
        pr = session(stage / "bavit.onnx").run(None, {"image": xb.numpy()})[0]
        verified["bavit"] = _check("bavit.onnx", {"fg_prob": _max_diff(pr, ref)}, {})

        say("pipeline.onnx")
        policy = opts.policy
        thr = opts.threshold if opts.threshold is not None else 0.5
        k = kept_per_image(opts.sparsity, n_p) if policy == "topk" else None
        pipe = Pipeline(bavit, pruned, dgrid, policy, thr if policy == "threshold" else None, k).eval()
        x1 = torch.randn(1, 3, *bsize, generator=g)
        _export(pipe, (x, x1), stage / "pipeline.onnx", ["pixel_values", "bavit_pixel_values"],
                ["logits", "boxes", "keep"], {"keep": {0: "K"}}, opts.opset)
        graphs["pipeline"] = {"file": "pipeline.onnx",
                              "inputs": [_io("pixel_values", (1, 3, *size)), _io("bavit_pixel_values", (1, 3, *bsize))],
                              "outputs": [_io("logits", (1, d, n_labels)), _io("boxes", (1, d, 4)),
                                          _io("keep", ["K"], "int64")]}
        # the reference: bavit.onnx's probabilities (what the pipeline sees), the documented
        # selection rule in numpy, and PyTorch's pruned forward
        pr = session(stage / "bavit.onnx").run(None, {"image": x1.numpy()})[0]
        keep = torch.as_tensor(reference_keep(pr, dgrid, policy, thr, k)).reshape(1, -1)
        with torch.no_grad():
            ref = pruned_forward(det, x, keep)
        lo, bo, ko = session(stage / "pipeline.onnx").run(None, {"pixel_values": x.numpy(), "bavit_pixel_values": x1.numpy()})
        if not np.array_equal(ko, np.flatnonzero(keep[0].numpy())):
            raise BavitError("pipeline.onnx: ONNX Runtime kept other tokens than the selection rule on the check input")
        verified["pipeline"] = _check("pipeline.onnx", {"logits": _max_diff(lo, ref.logits),
                                      "boxes": _max_diff(bo, ref.pred_boxes)}, {"logits": float(ref.logits.abs().max())})
        rule = ("keep a token when 1 - fg_prob < threshold (float64)" if policy == "threshold" else
                "keep the k tokens of highest fg_prob on the detector grid (ties: lower row-major index first)")
        selection = {"policy": policy, "threshold": thr if policy == "threshold" else None,
                     "sparsity": opts.sparsity if policy == "topk" else None, "k": k, "rule": rule,
                     "resample": "nearest", "postprocess_steps": 0}

    return graphs, verified, selection


def _finish(out: Path, opts, det, proto, dgrid, bavit, graphs, verified, selection, t0) -> dict:
    size = proto.size
    onnx, ort = require_onnx()
    import transformers

    cfg = det.config
    d, n_p = cfg.num_detection_tokens, dgrid[0] * dgrid[1]

    manifest = {
        "format": FORMAT,
        "bavit_version": __version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "onnx_version": onnx.__version__,
        "onnxruntime_version": ort.__version__,
        "opset": opts.opset,
        "exporter": "torch.onnx.export (TorchScript, dynamo=False)",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "pruned_tokens": opts.pruned_tokens,
        "detector": {
            "source": str(opts.detector), "weights_sha256": state_sha256(det), "input_size": list(size),
            "patch": cfg.patch_size, "grid": list(dgrid), "n_patches": n_p, "num_detection_tokens": d,
            "num_labels": cfg.num_labels, "id2label": {str(k): v for k, v in cfg.id2label.items()},
            "use_mid_position_embeddings": bool(cfg.use_mid_position_embeddings),
            "input_protocol": proto.as_dict(),
            "normalisation": {"scale": _scale_text(proto.rescale), "mean": list(proto.mean), "std": list(proto.std),
                              "layout": "RGB, NCHW"},
            "boxes": "normalised (cx, cy, w, h) in [0, 1]; logits' last class is no-object",
        },
        "bavit": None if bavit is None else {
            "source": str(opts.model), "weights_sha256": state_sha256(bavit), "input_size": [bavit.cfg.input_h, bavit.cfg.input_w],
            "patch": bavit.cfg.patch, "grid": list(bavit.cfg.grid_shape), "depth": bavit.cfg.depth,
            "normalisation": {"scale": "1/255", "mean": list(bavit.cfg.mean), "std": list(bavit.cfg.std), "layout": "RGB, NCHW"},
        },
        "selection": selection,
        "grids": grid_summary(cfg, size, bavit.cfg if bavit is not None else None),
        "graphs": graphs,
        "verified": {"tolerance": TOLERANCE, "max_abs_diff": verified},
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    _readable(out / MANIFEST)
    return {"out": str(out), "graphs": [g["file"] for g in graphs.values()], "grids": manifest["grids"],
            "verified": verified, "seconds": time.perf_counter() - t0, "input_protocol": proto.describe()}


def _scale_text(rescale: float) -> str:
    """The rescale factor as the manifest writes it: ``1/255`` (the usual), else the number."""
    return "1/255" if abs(rescale - 1 / 255) < 1e-12 else repr(float(rescale))
