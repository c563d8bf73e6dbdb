"""The images ``bavit detect`` runs on: files, folders (recursively) and glob patterns found
and named, and one image (a path, a PIL image or an array) turned into the detector's and
BAViT's inputs exactly as prune-eval decodes its datasets."""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..data.images import IMAGE_SUFFIXES, detector_inputs, load_image_sized, to_rgb8
from ..runtime.errors import InputFileError, OptionError

_MAGIC = set("*?[")


@dataclass(frozen=True)
class ImageSource:
    path: Path  # absolute
    name: str  # its name in the outputs: the path under the folder or pattern it came from (``/``-separated)


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def _under(p: Path, folder: Path | None) -> bool:
    return folder is not None and (p == folder or folder in p.parents)


def _walk(folder: Path, exclude: Path | None) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        d = Path(dirpath)
        dirnames[:] = sorted(n for n in dirnames if not n.startswith(".") and not _under((d / n).resolve(), exclude))
        found += [d / n for n in sorted(filenames) if _is_image(d / n)]
    return found


def _static_prefix(pattern: str) -> Path:
    parts = Path(pattern).parts
    k = next((i for i, s in enumerate(parts) if _MAGIC & set(s)), len(parts))
    return Path(*parts[:k]) if k else Path(".")


def find_images(inputs: Sequence[str | os.PathLike], exclude: str | os.PathLike | None = None) -> list[ImageSource]:
    """Every image named by ``inputs`` (files, folders searched recursively for
    .jpg/.jpeg/.png/.bmp/.webp, skipping hidden entries, or glob patterns with ``**``),
    in the order given (each folder's or pattern's images sorted), duplicates once, nothing
    under ``exclude`` (the output directory). An input that names nothing, or two images
    that would get one name, is an InputFileError."""
    if not inputs:
        raise OptionError("name the images: files, folders or glob patterns")
    ex = Path(exclude).expanduser().resolve() if exclude else None
    out: list[ImageSource] = []
    seen: dict[Path, str] = {}
    names: dict[str, Path] = {}
    for item in inputs:
        text = str(item)
        p = Path(text).expanduser()
        if p.is_file():
            found, base = [p], p.parent
        elif p.is_dir():
            found, base = _walk(p, ex), p
            if not found:
                raise InputFileError(p, f"no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        elif _MAGIC & set(text):
            base = _static_prefix(os.path.expanduser(text))
            found = [Path(f) for f in sorted(glob.glob(os.path.expanduser(text), recursive=True))
                     if Path(f).is_file() and _is_image(Path(f))]
            found = [f for f in found if not _under(f.resolve(), ex)]
            if not found:
                raise InputFileError(text, "the pattern matches no image files")
        else:
            raise InputFileError(p, "not found (expected an image, a folder or a glob pattern)")
        for f in found:
            r = f.resolve()
            if r in seen:
                continue
            name = f.relative_to(base).as_posix() if f.is_relative_to(base) else f.name
            if name in names:
                raise InputFileError(f, f"has the same name {name!r} as {names[name]} in the outputs; "
                                        "give their common folder instead")
            seen[r] = name
            names[name] = f
            out.append(ImageSource(r, name))
    return out


def check_header(path: Path) -> None:
    """Open ``path`` as an image without decoding its pixels (a cheap first check)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.size  # noqa: B018 - the header is read
    except FileNotFoundError:
        raise InputFileError(path, "image not found") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InputFileError(path, f"unreadable image ({type(exc).__name__})") from None


def as_pil(image):
    """A path, PIL image or array ((H, W, 3) or (H, W) uint8; float arrays in 0..1 or 0..255)
    → (an RGB PIL image, its original (h, w))."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        full, hw = load_image_sized(Path(image))
        return Image.fromarray(full), hw
    if isinstance(image, Image.Image):
        im = Image.fromarray(np.array(to_rgb8(image), dtype=np.uint8))
        return im, (im.size[1], im.size[0])
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4) or a.shape[0] < 1 or a.shape[1] < 1:
        raise OptionError(f"an image array must be (H, W, 3) RGB or (H, W) grey, got shape {a.shape}")
    if a.dtype != np.uint8:
        a = np.asarray(a, dtype=np.float64)
        a = a * 255.0 if a.size and np.nanmax(a) <= 1.0 else a
        a = np.clip(np.rint(np.nan_to_num(a)), 0, 255).astype(np.uint8)
    im = Image.fromarray(np.ascontiguousarray(a[..., :3]))
    return im, (im.size[1], im.size[0])


def to_inputs(image, prepare, bavit_hw: tuple[int, int] | None):
    """One image → (the detector's uint8 input through the protocol's ``prepare``, BAViT's
    uint8 input stretched (bilinear) to ``bavit_hw`` or None, the original (h, w)): what
    :func:`bavit_core.data.images.decode_for_detector` makes of a dataset's image."""
    im, hw = as_pil(image)
    det, resized = detector_inputs(im, prepare, [bavit_hw] if bavit_hw is not None else [])
    return det, (resized[0] if resized else None), hw
