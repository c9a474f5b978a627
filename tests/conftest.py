"""Shared fixtures (tiny recipes that train in seconds on 2 CPU cores) and the marker rules.

Tiers (pyproject.toml markers; README, "Tests"): `slow` trains through the Trainer or the CLI,
uses the real MiniLM for training, starts a subprocess or takes over 2 s; `multiproc` starts
several processes; `gpu` needs CUDA and is skipped here without it. `make test-fast` runs
`not slow and not multiproc`, `make test` everything.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from bitblend.config.load import apply_overrides, recipe_from_dict
from bitblend.config.schema import Recipe


@pytest.fixture(autouse=True, scope="session")
def _no_fake_peaks_in_the_user_cache() -> Any:
    """Tests write fake probe peaks (device "fake") into a cache of their own: one that
    writes them into the user's real cache (BITBLEND_CACHE_DIR or ~/.cache/bitblend) makes
    every later MFU and time estimate on the machine wrong. Fail the session if it happens."""
    from bitblend.data.spoken_words import cache_dir

    probe = cache_dir() / "probe.json"
    yield
    if probe.is_file():
        import json

        fake = [k for k, v in json.loads(probe.read_text()).items() if v.get("device") == "fake"]
        assert not fake, f"a test wrote fake probe peaks into {probe}: {fake}"


def tiny_recipe_dict(**sections: Any) -> dict[str, Any]:
    """A tiny-bert recipe on a 256-example slice of BBC News; `sections` update it."""
    data: dict[str, Any] = {
        "name": "tiny-test",
        "model": {"backbone": "tiny-bert", "max_length": 32},
        "tasks": [{"name": "bbc", "data": "bbc_news", "max_examples": 256}],
        "precision": {"recipe": "32-true"},
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "schedule": {"name": "linear"},
        "train": {"steps": 8, "batch_size": 8, "eval_max_examples": 32, "threads": 2},
    }
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return data


def make_recipe(*overrides: str, **sections: Any) -> Recipe:
    """A validated tiny recipe with `--set`-style overrides applied."""
    return recipe_from_dict(apply_overrides(tiny_recipe_dict(**sections), list(overrides)))


@pytest.fixture
def tiny_recipe() -> Any:
    """The `make_recipe` factory."""
    return make_recipe


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests skip cleanly (one reason line) where torch sees no CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu: needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
