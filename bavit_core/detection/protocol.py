"""The input protocol: how an image becomes the detector's input.

Two protocols, one recorded choice per run:

* ``checkpoint`` — what the checkpoint's own image processor does (its
  ``preprocessor_config.json``; for the hustvl YOLOS models shortest edge 512 or 800,
  longest ≤ 1333, aspect kept, sizes rounded down to multiples of 16), each image on its
  own grid. Published mAPs (the model cards') use it; under it our dense detections equal
  ``transformers``' processor + model + post-processing.
* ``square`` — every image stretched to one H×W (the paper's Table 2: 512×512 for
  YOLOS-tiny, 1 024 tokens per image, eq. 4 exactly as printed).

Both resize with the checkpoint's own processor (``transformers``' code, so its rounding,
interpolation and antialiasing), the square one with its size replaced; the normalisation
(rescale factor, mean, std) is the processor's. The default is the checkpoint's protocol
when it has a processor file; a detector written by ``bavit finetune`` has one that says
the square size it was trained at. Never the config's ``image_size``: that is only the
size the position embeddings were stored at.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..runtime.errors import BavitError, InputFileError, OptionError

PROCESSOR_FILE = "preprocessor_config.json"
PROTOCOLS = ("checkpoint", "square")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputProtocol:
    kind: str  # "checkpoint" or "square"
    size: tuple[int, int] | None  # square: (h, w); checkpoint: None (each image its own)
    processor_size: dict  # the processor's own size rule, as its file states it
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    rescale: float = 1 / 255
    source: str = ""  # where the choice came from (a file, an option)
    _processor: object = field(default=None, compare=False, repr=False)

    def describe(self) -> str:
        """``square 512x512`` or ``checkpoint (shortest edge 512, longest 1333)``."""
        if self.kind == "square":
            return f"square {self.size[0]}x{self.size[1]}"
        return f"checkpoint ({describe_size(self.processor_size)})"

    def as_dict(self) -> dict:
        return {"protocol": self.kind, "size": list(self.size) if self.size else None,
                "processor_size": dict(self.processor_size), "mean": list(self.mean), "std": list(self.std),
                "rescale": self.rescale, "source": self.source, "description": self.describe()}

    def prepare(self, image) -> np.ndarray:
        """A decoded RGB image (PIL or (h, w, 3) uint8) → the detector's resized uint8
        (H, W, 3) input, exactly as the checkpoint's processor resizes it (before its
        rescaling and normalisation, which :func:`bavit_core.data.images.to_input` applies)."""
        kw = dict(do_rescale=False, do_normalize=False, do_pad=False, return_tensors="pt")
        if self.kind == "square":
            kw["size"] = {"height": int(self.size[0]), "width": int(self.size[1])}
        px = self._processor(images=image, **kw)["pixel_values"][0]
        return np.ascontiguousarray(px.permute(1, 2, 0).numpy()).astype(np.uint8, copy=False)


def describe_size(size: dict) -> str:
    names = {"shortest_edge": "shortest edge", "longest_edge": "longest", "height": "height", "width": "width",
             "max_height": "max height", "max_width": "max width"}
    return ", ".join(f"{names.get(k, k)} {v}" for k, v in size.items() if v is not None)


def _processor_path(name_or_path: str) -> Path | None:
    """The processor file of a local checkpoint directory, or of a cached hub checkpoint;
    None where there is none."""
    p = Path(name_or_path)
    if p.is_dir():
        f = p / PROCESSOR_FILE
        return f if f.is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(str(name_or_path), PROCESSOR_FILE)
        return Path(hit) if isinstance(hit, str) else None
    except ValueError:  # huggingface_hub's HFValidationError: not a repo id, so no cached processor
        return None


def _load_processor(path: Path | None):
    """The checkpoint's image processor (transformers' own class from its file), or
    YolosImageProcessor's defaults without a file."""
    from transformers import AutoImageProcessor, YolosImageProcessor
    from transformers.utils import logging as hf_logging

    if path is None:
        return YolosImageProcessor()
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        raise InputFileError(path, "unreadable image processor config (not JSON)") from None
    if not isinstance(doc, dict):
        raise InputFileError(path, "unreadable image processor config (not a JSON object)")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        proc = AutoImageProcessor.from_pretrained(str(path.parent), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputFileError(path, f"not a usable image processor config ({str(exc).splitlines()[0][:160]})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if not hasattr(proc, "post_process_object_detection"):
        raise InputFileError(path, f"not an object-detection image processor ({type(proc).__name__})")
    return proc


def _triple(v, default, path, what) -> tuple[float, float, float]:
    if v is None:
        return default
    if isinstance(v, (int, float)):
        v = [v] * 3
    try:
        t = tuple(float(x) for x in v)
    except (TypeError, ValueError):
        raise InputFileError(path, f"{what} must be three numbers, got {v!r}") from None
    if len(t) != 3 or (what == "image_std" and min(t) <= 0):
        raise InputFileError(path, f"{what} must be three numbers{' > 0' if what == 'image_std' else ''}, got {v!r}")
    return t


def _size_dict(size) -> dict:
    if size is None:
        return {}
    if hasattr(size, "items"):
        return {k: v for k, v in dict(size).items() if v is not None}
    return {k: getattr(size, k) for k in ("shortest_edge", "longest_edge", "height", "width", "max_height",
                                          "max_width") if getattr(size, k, None) is not None}


def input_protocol(detector: str, size: tuple[int, int] | None = None, patch: int = 16) -> InputProtocol:
    """The protocol for ``detector`` (a checkpoint directory or hub name): ``size`` given →
    ``square`` at that (h, w) (option ``--detector-size``); else the checkpoint's own
    processor. A checkpoint without a processor file needs ``size``."""
    path = _processor_path(detector)
    if size is None and path is None:
        raise BavitError(f"detector {detector!r} has no {PROCESSOR_FILE}, so its input size is unknown: "
                         "pass --detector-size (e.g. 512 for the paper's square protocol)")
    proc = _load_processor(path)
    where = str(path) if path is not None else "YolosImageProcessor defaults"
    do_norm = bool(getattr(proc, "do_normalize", True))
    mean = _triple(getattr(proc, "image_mean", None), IMAGENET_MEAN, path, "image_mean") if do_norm else (0.0,) * 3
    std = _triple(getattr(proc, "image_std", None), IMAGENET_STD, path, "image_std") if do_norm else (1.0,) * 3
    rescale = float(getattr(proc, "rescale_factor", 1 / 255)) if getattr(proc, "do_rescale", True) else 1.0
    psize = _size_dict(getattr(proc, "size", None))
    if size is not None:
        h, w = int(size[0]), int(size[1])
        if h % patch or w % patch:
            raise OptionError(f"--detector-size {h}x{w} is not divisible by the detector patch {patch}")
        return InputProtocol("square", (h, w), psize, mean, std, rescale, "--detector-size", proc)
    if not getattr(proc, "do_resize", True):
        raise InputFileError(path, "the processor does not resize (do_resize false): pass --detector-size")
    sq = square_size(psize)
    if sq is not None:  # a processor that stretches to one size: the square protocol, from its file
        if sq[0] % patch or sq[1] % patch:
            raise InputFileError(path, f"size {sq[0]}x{sq[1]} is not divisible by the detector patch {patch}")
        return InputProtocol("square", sq, psize, mean, std, rescale, where, proc)
    return InputProtocol("checkpoint", None, psize, mean, std, rescale, where, proc)


def square_size(size: dict) -> tuple[int, int] | None:
    if size.get("height") and size.get("width") and not size.get("shortest_edge"):
        return int(size["height"]), int(size["width"])
    return None


def write_processor(dest: Path, size: tuple[int, int], mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Path:
    """Write a ``preprocessor_config.json`` (transformers' YolosImageProcessor) that
    stretches every image to ``size`` (h, w) with the given normalisation: what ``bavit
    finetune`` trained at, so the detector directory loads in ``transformers.pipeline``
    and our default protocol is the trained one."""
    from transformers import YolosImageProcessor

    proc = YolosImageProcessor(size={"height": int(size[0]), "width": int(size[1])},
                               image_mean=list(mean), image_std=list(std))
    proc.save_pretrained(str(dest))
    return Path(dest) / PROCESSOR_FILE


DEFAULT_SQUARE = 512  # the paper's training and Table 2 size for YOLOS-tiny


def square_protocol(detector: str | None, size: tuple[int, int] | None = None, patch: int = 16,
                    option: str = "--detector-size") -> InputProtocol:
    """The *square* protocol a fixed-size consumer of ``detector`` (``bavit finetune``'s
    training, ``bavit export``'s graphs) uses: ``size`` when given (``option``); else the
    checkpoint's own square size (a detector this toolkit trained says it in its processor
    file); else its processor's shortest edge as a square (hustvl/yolos-tiny: 512, the
    paper's); else 512. The normalisation is always the checkpoint's processor's;
    ``detector`` None (a new detector) takes ImageNet's."""
    path = _processor_path(detector) if detector else None
    if size is None and path is not None:
        own = input_protocol(detector, None, patch)
        if own.kind == "square":
            return own
        s = own.processor_size.get("shortest_edge")
        if not isinstance(s, int) or s <= 0:
            raise InputFileError(path, f"cannot derive a square size from its size rule ({describe_size(own.processor_size)}): "
                                       f"pass {option}")
        s -= s % patch
        return InputProtocol("square", (s, s), own.processor_size, own.mean, own.std, own.rescale,
                             f"{path} (shortest edge {own.processor_size['shortest_edge']}, as a square)", own._processor)
    if size is None:
        size, source = (DEFAULT_SQUARE, DEFAULT_SQUARE), f"default {DEFAULT_SQUARE}"
    else:
        source = option
    h, w = int(size[0]), int(size[1])
    if h % patch or w % patch:
        raise OptionError(f"{option} {h}x{w} is not divisible by the detector patch {patch}")
    if path is not None:  # the checkpoint's normalisation, at the given size
        return replace(input_protocol(detector, (h, w), patch), source=source)
    return InputProtocol("square", (h, w), {"height": h, "width": w}, source=source, _processor=_load_processor(None))
