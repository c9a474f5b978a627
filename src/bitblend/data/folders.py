"""A folder with one sub-folder per class (`path/<class>/<file>`), as image and audio
sources read it: the files of the given kinds and their labels, sorted and stable."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from bitblend.errors import BitblendError


def class_folder(
    path: Path, extensions: Collection[str], noun: str, none_found: str
) -> tuple[list[Path], list[str], list[str]]:
    """(files, their labels, the sorted class names) of `path`; hidden entries skipped.
    `none_found` is the error when no file has one of `extensions`; `noun` names the files
    in the error for fewer than two classes."""
    classes = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    files: list[Path] = []
    labels: list[str] = []
    for d in classes:
        for f in sorted(d.iterdir()):
            if f.is_file() and f.suffix.lower() in extensions and not f.name.startswith("."):
                files.append(f)
                labels.append(d.name)
    if not files:
        raise BitblendError(f"{path}: {none_found}")
    found = sorted(set(labels))
    if len(found) < 2:
        raise BitblendError(
            f"{path}: {noun} of {len(found)} class ({', '.join(found)}); expected at least 2 "
            "sub-folders, one per class"
        )
    return files, labels, found
