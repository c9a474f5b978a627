"""Image files and folders decoded with Pillow, their one-line errors, and patching."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bitblend.data.images import load_image, load_image_folder, patchify
from bitblend.errors import BitblendError


def _folder(root: Path, classes: dict[str, int], size: tuple[int, int] = (8, 8)) -> dict:
    """PNGs of random pixels, `classes[name]` per class; returns {path: uint8 RGB array}."""
    rng = np.random.default_rng(0)
    written = {}
    for cls, count in classes.items():
        (root / cls).mkdir(parents=True)
        for i in range(count):
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            path = root / cls / f"{i:02d}.png"
            Image.fromarray(arr).save(path)
            written[path] = arr
    return written


def test_image_folder_round_trip(tmp_path: Path) -> None:
    written = _folder(tmp_path / "pets", {"dog": 3, "cat": 2})
    (tmp_path / "pets" / "cat" / "notes.txt").write_text("not an image")  # ignored
    src = load_image_folder(tmp_path / "pets", None)
    img = src.train.image
    assert img is not None and img.shape == (5, 8, 8, 3) and img.dtype == np.float32
    assert src.train.labels == ["cat", "cat", "dog", "dog", "dog"]  # sorted classes and files
    assert src.label_names == ["cat", "dog"] and src.train.modalities == ["image"]
    expected = [written[p] for p in sorted(written, key=lambda p: (p.parent.name, p.name))]
    np.testing.assert_allclose(img, np.stack(expected) / 255.0, atol=1e-6)  # PNG is lossless


def test_grayscale_files_become_rgb_and_size_resizes(tmp_path: Path) -> None:
    _folder(tmp_path / "f", {"a": 1, "b": 1}, size=(12, 10))
    gray = np.arange(120, dtype=np.uint8).reshape(10, 12)
    Image.fromarray(gray, mode="L").save(tmp_path / "f" / "b" / "gray.png")
    src = load_image_folder(tmp_path / "f", None)
    assert src.train.image is not None and src.train.image.shape == (3, 10, 12, 3)
    np.testing.assert_allclose(src.train.image[2], np.repeat(gray[..., None], 3, 2) / 255.0)
    resized = load_image_folder(tmp_path / "f", 4).train.image
    assert resized is not None and resized.shape == (3, 4, 4, 3)
    assert resized.min() >= 0.0 and resized.max() <= 1.0


def test_wrong_size_and_corrupt_files_are_named(tmp_path: Path) -> None:
    _folder(tmp_path / "f", {"a": 2, "b": 2})
    odd = tmp_path / "f" / "b" / "zz.png"
    Image.fromarray(np.zeros((9, 8, 3), dtype=np.uint8)).save(odd)
    with pytest.raises(BitblendError) as err:
        load_image_folder(tmp_path / "f", None)
    assert str(err.value) == (
        f"{odd}: image is 8x9, expected 8x8 like the others; set tasks[i].image_size to resize"
    )
    assert load_image_folder(tmp_path / "f", 8).train.image is not None  # resizing fixes it
    odd.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(BitblendError, match="^" + re.escape(f"{odd}: cannot decode image")):
        load_image_folder(tmp_path / "f", 8)
    good = tmp_path / "f" / "a" / "00.png"
    odd.write_bytes(good.read_bytes()[:60])  # a truncated PNG: header fine, pixels missing
    with pytest.raises(BitblendError, match="^" + re.escape(f"{odd}: cannot decode image")):
        load_image(odd, None)
    with pytest.raises(BitblendError, match=r"missing\.png: image file not found"):
        load_image(tmp_path / "missing.png", None)


def test_folder_errors(tmp_path: Path) -> None:
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(BitblendError, match=r"empty: no images found; expected one sub-folder"):
        load_image_folder(tmp_path / "empty", None)
    _folder(tmp_path / "one", {"only": 3})
    with pytest.raises(BitblendError, match=r"one: images of 1 class \(only\); expected at least"):
        load_image_folder(tmp_path / "one", None)
    with pytest.raises(BitblendError, match=r"nowhere: not a directory"):
        load_image_folder(tmp_path / "nowhere", None)


def test_patchify_shapes_and_values() -> None:
    images = np.arange(2 * 4 * 6 * 3, dtype=np.float32).reshape(2, 4, 6, 3)  # (n, H, W, C)
    patches = patchify(images, 2)
    assert patches.shape == (2, 6, 12)  # (4/2) * (6/2) patches of 2*2*3 values
    # patch k = row k // 3, column k % 3, flattened as (row, column, channel)
    for k in range(6):
        r, c = divmod(k, 3)
        block = images[:, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2, :]
        np.testing.assert_array_equal(patches[:, k], block.reshape(2, -1))
    assert patchify(images, 1).shape == (2, 24, 3)
    with pytest.raises(BitblendError, match=r"patch_size: 4 does not divide the 6x4 images"):
        patchify(images, 4)
    with pytest.raises(BitblendError, match=r"expected shape \(n, H, W, C\)"):
        patchify(images[0], 2)
