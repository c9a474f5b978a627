"""Images from files: decode, check size, and read image folders (one sub-folder per class)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bitblend.data.table import SourceData, Table
from bitblend.errors import BitblendError

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def load_image(path: Path, size: int | None, expect: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1]; resized to size x size when `size` is set."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            rgb = opened.convert("RGB")
        if size is not None:
            rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
        arr = np.asarray(rgb, dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise BitblendError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise BitblendError(f"{path}: cannot decode image ({type(exc).__name__})") from None
    if size is None and expect is not None and arr.shape[:2] != expect:
        raise BitblendError(
            f"{path}: image is {arr.shape[1]}x{arr.shape[0]}, expected {expect[1]}x{expect[0]} "
            "like the others; set tasks[i].image_size to resize"
        )
    return arr


def load_images(paths: list[Path], size: int | None) -> np.ndarray:
    """(n, H, W, 3): every image decoded; without `size` all must share the first's size."""
    first = load_image(paths[0], size)
    out = [first]
    for p in paths[1:]:
        out.append(load_image(p, size, first.shape[:2]))
    return np.stack(out)


def load_image_folder(path: Path, size: int | None) -> SourceData:
    """`path/<class>/<image>` -> image table labelled by sub-folder name."""
    classes = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    files: list[Path] = []
    labels: list[str] = []
    for d in classes:
        for f in sorted(d.iterdir()):
            if f.suffix.lower() in EXTENSIONS:
                files.append(f)
                labels.append(d.name)
    if not files:
        raise BitblendError(
            f"{path}: no images found; expected one sub-folder per class holding image files"
        )
    if len(set(labels)) < 2:
        raise BitblendError(f"{path}: images of {len(set(labels))} class; expected at least 2")
    return SourceData(Table(labels=labels, image=load_images(files, size)))
