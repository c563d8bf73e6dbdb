"""Image decoding and resizing, and the decode-once image store (one decode per image,
resized to every size a run needs, held in memory or spilled to a memory-mapped file)."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..runtime.errors import InputFileError
from ..runtime.workers import usable_cores

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def load_image(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode to RGB uint8 (H, W, 3); stretch-resize (bilinear) to ``size`` = (h, w)."""
    return load_image_sized(path, size)[0]


def load_image_sized(path: Path, size: tuple[int, int] | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Like :func:`load_image`, also returning the original (h, w)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            limit = Image.MAX_IMAGE_PIXELS
            if limit and im.size[0] * im.size[1] > limit:
                raise Image.DecompressionBombError(f"({im.size[0] * im.size[1]} pixels)")
            im = to_rgb8(im)
            orig = (im.size[1], im.size[0])
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            return np.array(im, dtype=np.uint8), orig
    except FileNotFoundError:
        raise InputFileError(path, "image not found") from None
    except Image.DecompressionBombError as exc:
        raise InputFileError(path, f"image too large to decode safely ({_pixels(exc)}; a decompression bomb?)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InputFileError(path, f"unreadable image ({type(exc).__name__})") from None


def _pixels(exc) -> str:
    import re

    m = re.search(r"\((\d+) pixels\)", str(exc))
    return f"{int(m.group(1)):,} pixels" if m else "too many pixels"


def to_rgb8(im):
    """An RGB 8-bit PIL image from any mode. 16- and 32-bit integer greys (``I;16*``, ``I``:
    16-bit PNGs) are scaled by 1/257 to 0..255 (PIL's own ``convert`` clips them, turning a
    mid-grey 16-bit image almost white); float greys (``F``) are clipped to 0..255."""
    from PIL import Image

    if im.mode == "RGB":
        return im
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im, dtype=np.float64)
        if im.mode == "I" and a.max(initial=0) > 65535:
            a = a / max(a.max(), 1.0) * 65535.0
        a = np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if im.mode == "F":
        a = np.clip(np.nan_to_num(np.asarray(im, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
    return im.convert("RGB")


def load_image_sizes(path: Path, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    """Decode once and stretch-resize (bilinear) to every (h, w) in ``sizes``."""
    from PIL import Image

    full, _ = load_image_sized(path)
    im = Image.fromarray(full)
    return [full if full.shape[:2] == tuple(hw) else np.asarray(im.resize((hw[1], hw[0]), Image.BILINEAR))
            for hw in sizes]


def list_images(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def resolve_paths(images_dir: Path, file_names: Sequence[str]) -> tuple[list[Path], list[int]]:
    """Paths of the files that exist and the indices of the missing ones."""
    present = set(os.listdir(images_dir)) if images_dir.is_dir() else set()
    paths, missing = [], []
    for k, n in enumerate(file_names):
        if n in present or (images_dir / n).is_file():
            paths.append(images_dir / n)
        else:
            missing.append(k)
    return paths, missing


def load_images(
    paths: Sequence[Path], size: tuple[int, int], workers: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Decode and resize all images into one (N, h, w, 3) uint8 array.

    PIL releases the GIL while decoding and resizing, so threads scale across cores.
    """
    out = np.empty((len(paths), size[0], size[1], 3), dtype=np.uint8)
    n_threads = workers if workers > 0 else min(4, usable_cores())

    def one(k):
        out[k] = load_image(paths[k], size)
        return k

    with ThreadPoolExecutor(max_workers=n_threads) as ex:
        for _ in ex.map(one, range(len(paths))):
            if progress:
                progress(1, len(paths))
    return out


def image_store(n: int, hw, spill_dir: Path | None = None, limit: int = 2 << 30) -> np.ndarray:
    """(n, h, w, 3) uint8: in memory, or a memory-mapped temporary file in ``spill_dir`` when
    it would exceed ``limit`` bytes (COCO val at 512² is 3.9 GB). The file is unlinked at
    once, so it disappears with the array."""
    shape = (n, hw[0], hw[1], 3)
    if n * hw[0] * hw[1] * 3 <= limit or spill_dir is None:
        return np.empty(shape, dtype=np.uint8)
    import tempfile

    spill_dir = Path(spill_dir)
    spill_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=spill_dir, prefix=".images-", suffix=".u8") as f:
        return np.memmap(f.name, dtype=np.uint8, mode="w+", shape=shape)


def decode_once(paths: Sequence[Path], sizes: Sequence[tuple[int, int]], spill_dir: Path | None = None,
                progress: Callable[[int, int], None] | None = None) -> list[np.ndarray]:
    """Decode every image once and stretch-resize it to each (h, w) in ``sizes``: one
    (N, h, w, 3) uint8 store per size (see :func:`image_store`)."""
    stores = [image_store(len(paths), hw, spill_dir) for hw in sizes]
    for k, path in enumerate(paths):
        for store, im in zip(stores, load_image_sizes(path, sizes)):
            store[k] = im
        if progress:
            progress(1, len(paths))
    return stores


def to_input(batch_u8, mean, std, device=None, rescale: float = 1 / 255):
    """(B, h, w, 3) uint8 (numpy or tensor) → normalised float (B, 3, h, w) tensor:
    ``(x · rescale − mean) / std``. A list of (h_i, w_i, 3) images of different sizes gives
    a list of (3, h_i, w_i) tensors (one size: stacked as above)."""
    import torch

    if isinstance(batch_u8, (list, tuple)):
        if len({tuple(np.shape(a)) for a in batch_u8}) <= 1:
            batch_u8 = np.stack([np.asarray(a) for a in batch_u8]) if batch_u8 else np.zeros((0, 1, 1, 3), np.uint8)
        else:
            return [to_input(np.asarray(a)[None], mean, std, device, rescale)[0] for a in batch_u8]
    x = torch.as_tensor(batch_u8)
    if device is not None:
        x = x.to(device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).float()
    x = x.div_(255.0) if rescale == 1 / 255 else x.mul_(rescale)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return x.sub_(m).div_(s)


class ImageList:
    """Images of different sizes, (h_i, w_i, 3) uint8 each, indexable like an (N, …) store:
    ``store[i]`` is one image, ``store[a:b]`` a list. Held in memory up to ``limit`` bytes,
    past it appended to an unlinked temporary file in ``spill_dir`` and read back
    memory-mapped (COCO val under a 512-shortest-edge protocol is ~5 GB)."""

    def __init__(self, n: int, spill_dir: Path | None = None, limit: int = 2 << 30):
        self._items: list = [None] * n
        self._bytes = 0
        self._limit = limit
        self._spill_dir = spill_dir
        self._file = None

    def __len__(self) -> int:
        return len(self._items)

    def __setitem__(self, i: int, im: np.ndarray) -> None:
        im = np.ascontiguousarray(im, dtype=np.uint8)
        if self._bytes + im.nbytes > self._limit and self._spill_dir is not None:
            if self._file is None:
                import tempfile

                Path(self._spill_dir).mkdir(parents=True, exist_ok=True)
                self._file = tempfile.TemporaryFile(dir=self._spill_dir, prefix=".images-")
            off = self._file.seek(0, 2)
            self._file.write(im.tobytes())
            self._file.flush()
            self._items[i] = ("spill", off, im.shape)
            return
        self._bytes += im.nbytes
        self._items[i] = im

    def _get(self, i: int) -> np.ndarray:
        it = self._items[i]
        if isinstance(it, tuple):
            _, off, shape = it
            return np.memmap(self._file, dtype=np.uint8, mode="r", offset=off, shape=shape)
        return it

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._get(k) for k in range(*i.indices(len(self)))]
        if isinstance(i, (list, np.ndarray)):
            return [self._get(int(k)) for k in i]
        return self._get(int(i))

    @property
    def shapes(self) -> list[tuple[int, int]]:
        return [tuple(self._get(k).shape[:2]) for k in range(len(self))]


def detector_inputs(im, prepare: Callable, other_sizes: Sequence[tuple[int, int]] = ()) -> tuple:
    """One RGB PIL image → (the detector's input through ``prepare``, a stretch-resize
    (bilinear) to each of ``other_sizes``: BAViT's input); what every decoder here makes."""
    from PIL import Image

    full = np.asarray(im)
    return prepare(im), [full if full.shape[:2] == tuple(hw) else np.asarray(im.resize((hw[1], hw[0]), Image.BILINEAR))
                         for hw in other_sizes]


def decode_for_detector(paths: Sequence[Path], prepare: Callable, fixed: tuple[int, int] | None,
                        other_sizes: Sequence[tuple[int, int]] = (), spill_dir: Path | None = None,
                        progress: Callable[[int, int], None] | None = None) -> list:
    """Decode every image once: the detector's input through ``prepare`` (the input
    protocol's resize; one (N, H, W, 3) store when every image gets the size ``fixed``,
    else an :class:`ImageList`), and a stretch-resize (bilinear) to each of
    ``other_sizes`` (BAViT's input), one (N, h, w, 3) store each."""
    from PIL import Image

    det = image_store(len(paths), fixed, spill_dir) if fixed is not None else ImageList(len(paths), spill_dir)
    others = [image_store(len(paths), hw, spill_dir) for hw in other_sizes]
    for k, path in enumerate(paths):
        full, _ = load_image_sized(path)
        x, resized = detector_inputs(Image.fromarray(full), prepare, other_sizes)
        if fixed is not None and x.shape[:2] != tuple(fixed):
            raise InputFileError(path, f"the detector's processor made a {x.shape[0]}x{x.shape[1]} input, "
                                       f"expected {fixed[0]}x{fixed[1]}")
        det[k] = x
        for store, r in zip(others, resized):
            store[k] = r
        if progress:
            progress(1, len(paths))
    return [det] + others
