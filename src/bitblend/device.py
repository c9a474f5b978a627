"""Which torch device a recipe or command runs on: a helper every layer may use."""

from __future__ import annotations

import torch

from bitblend.errors import BitblendError


def pick_device(choice: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; `cuda` without a GPU is an error."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise BitblendError("train.device: cuda requested but no CUDA device is available")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs kernels asynchronously), so a wall-clock
    timer read after this call covers the work; a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
