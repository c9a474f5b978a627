"""A small tmpfs to fill up (disk-full and read-only tests): needs root, else skips."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


class SmallDisk:
    """A tmpfs of a given size at `path`; `resize` frees space, `read_only` freezes it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _mount(self, *opts: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["mount", *opts, str(self.path)], capture_output=True, text=True, check=False
        )

    def resize(self, size: str) -> None:
        """Grow (or shrink) the file system in place: 'freeing space'."""
        r = self._mount("-o", f"remount,size={size}")
        assert r.returncode == 0, r.stderr

    def read_only(self, on: bool = True) -> None:
        """Remount read-only (or back to read-write)."""
        r = self._mount("-o", "remount," + ("ro" if on else "rw"))
        assert r.returncode == 0, r.stderr


@pytest.fixture(name="small_disk")
def small_disk_fixture(tmp_path: Path) -> Iterator[SmallDisk]:
    """A 4 MiB tmpfs under tmp_path (resize it in the test); unmounted afterwards."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    disk = SmallDisk(tmp_path / "disk")
    disk.path.mkdir()
    r = disk._mount("-t", "tmpfs", "-o", "size=4m", "tmpfs")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk.path)], check=False)
