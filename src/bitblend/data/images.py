"""Images from files: decode, check size, read image folders (one sub-folder per class), patch.

Every image is decoded to RGB, whatever its stored mode (L, P, RGBA, CMYK...), so that one
source always has 3 channels and a folder mixing grayscale and colour files stays one shape.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bitblend.data.folders import class_folder
from bitblend.data.table import SourceData, Table
from bitblend.errors import BitblendError

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def load_image(path: Path, size: int | None, expect: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1]; resized to size x size when `size` is set.

    Without `size`, `expect` is the (H, W) every image of the source must have (the first
    image's); a different one is an error naming the file.
    """
    from PIL import Image, UnidentifiedImageError

    if size is not None and size < 1:
        raise BitblendError(f"image_size: expected a positive number of pixels, got {size}")
    try:
        with Image.open(path) as opened:
            rgb = opened.convert("RGB")  # decodes the pixels: a truncated file fails here
        if size is not None:
            rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
        arr = np.asarray(rgb, dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise BitblendError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
            Image.DecompressionBombError) as exc:  # fmt: skip
        raise BitblendError(f"{path}: cannot decode image ({type(exc).__name__})") from None
    if size is None and expect is not None and arr.shape[:2] != expect:
        raise BitblendError(
            f"{path}: image is {arr.shape[1]}x{arr.shape[0]}, expected {expect[1]}x{expect[0]} "
            "like the others; set tasks[i].image_size to resize"
        )
    return arr


def load_images(paths: list[Path], size: int | None) -> np.ndarray:
    """(n, H, W, 3): every image decoded; without `size` all must share the first's size."""
    if not paths:
        raise BitblendError("no image files to load")
    first = load_image(paths[0], size)
    out = np.empty((len(paths), *first.shape), dtype=np.float32)  # one allocation, no stack copy
    out[0] = first
    for i, p in enumerate(paths[1:], start=1):
        out[i] = load_image(p, size, first.shape[:2])
    return out


def load_image_folder(path: Path, size: int | None) -> SourceData:
    """`path/<class>/<image>` -> image table labelled by sub-folder name (sorted, stable)."""
    if not path.is_dir():
        raise BitblendError(f"{path}: not a directory; expected one sub-folder per class")
    files, labels, found = class_folder(
        path,
        EXTENSIONS,
        "images",
        "no images found; expected one sub-folder per class holding image files "
        f"({', '.join(sorted(EXTENSIONS))})",
    )
    return SourceData(
        Table(labels=labels, image=load_images(files, size)),
        label_names=found,
        description=f"image folder {path.name}",
    )


def patchify(images: np.ndarray, patch: int) -> np.ndarray:
    """(n, H, W, C) -> (n, H/p * W/p, p*p*C) non-overlapping patches, row-major.

    Each patch flattens as (row, column, channel) within the patch, the layout a ViT's
    linear patch embedding expects.
    """
    if images.ndim != 4:
        raise BitblendError(f"images: expected shape (n, H, W, C), got {images.shape}")
    n, h, w, c = images.shape
    if patch < 1 or h % patch or w % patch:
        raise BitblendError(
            f"patch_size: {patch} does not divide the {w}x{h} images; pick a divisor of "
            "both sides or set image_size"
        )
    x = images.reshape(n, h // patch, patch, w // patch, patch, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, (h // patch) * (w // patch), patch * patch * c)
