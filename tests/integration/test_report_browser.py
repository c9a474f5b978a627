"""report.html in a real browser (headless system Chromium via selenium): every image
decodes, nothing is logged as SEVERE, and a screenshot is kept for a human to look at.

Skipped only where Chromium is not installed and CI is not set; in CI (CI=true) a missing
browser fails the test, because .ci/run installs it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from bitblend.config.load import apply_overrides, recipe_from_dict
from bitblend.report.plots import TITLES
from bitblend.train.trainer import Trainer
from tests.conftest import tiny_recipe_dict

# Trains a run, then drives Chromium.
pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def _need_browser() -> None:
    """Skip (or, under CI, fail) unless chromium, chromedriver and selenium are here."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).is_file()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[dev]')")
    if not missing:
        return
    why = f"missing {', '.join(missing)} (apt-get install -y chromium chromium-driver)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI: {why}")
    pytest.skip(why)


def _driver() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: selenium-manager would otherwise try to download one.
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)


def test_report_renders_in_chromium(tmp_path: Path) -> None:
    _need_browser()
    data = tiny_recipe_dict()
    data["tasks"].append({"name": "digits", "data": "digits", "patch_size": 4})
    sets = ["train.steps=6", "train.eval_every=3", "train.batch_size=4"]
    run = tmp_path / "run"
    recipe = recipe_from_dict(apply_overrides(data, sets))
    Trainer(recipe, run, console=Console(quiet=True), show_progress=False).fit()
    page = run / "report.html"
    assert page.is_file()

    driver = _driver()
    try:
        driver.get(page.resolve().as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth]);"
        )
        headings = [h.text for h in driver.find_elements("css selector", "h2")]
        height = driver.execute_script("return document.documentElement.scrollHeight;")
        driver.set_window_size(1400, min(int(height) + 150, 12000))  # the whole page
        shot = tmp_path / "report.png"
        assert driver.save_screenshot(str(shot))
        logs = driver.get_log("browser")
    finally:
        driver.quit()

    print(f"screenshot: {shot}")
    assert len(images) == len(TITLES) - 1  # fp32: the loss-scale section is a note
    for alt, complete, width in images:
        assert complete and width > 0, f"image {alt!r} did not decode"
    assert headings == ["Summary", *TITLES.values()]
    severe = [entry for entry in logs if entry.get("level") == "SEVERE"]
    assert not severe, severe
    assert shot.stat().st_size > 10_000


def test_language_model_report_renders_in_chromium(tmp_path: Path) -> None:
    """A causal-LM run's extra sections: per-domain perplexity decodes as an image, and the
    generated samples table shows its text."""
    _need_browser()
    data = {
        "name": "lm-report",
        "model": {"backbone": "llama-tiny", "max_length": 32, "vocab_size": 300},
        "tasks": [
            {"name": "news", "data": "bbc_news", "head": "causal_lm", "max_examples": 32},
            {"name": "code", "data": "python_stdlib", "head": "causal_lm", "max_examples": 32},
        ],
        "precision": {"recipe": "32-true"},
        "train": {"steps": 2, "batch_size": 4, "eval_every": 1, "eval_max_examples": 4,
                  "threads": 2},
    }  # fmt: skip
    run = tmp_path / "run"
    Trainer(recipe_from_dict(data), run, console=Console(quiet=True), show_progress=False).fit()
    driver = _driver()
    try:
        driver.get((run / "report.html").resolve().as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth]);"
        )
        headings = [h.text for h in driver.find_elements("css selector", "h2")]
        cells = [c.text for c in driver.find_elements("css selector", "#samples td")]
        logs = driver.get_log("browser")
    finally:
        driver.quit()
    assert headings[-2:] == ["Validation perplexity per domain", "Generated samples"]
    assert images[-1][:2] == ["Validation perplexity per domain", True]
    assert images[-1][2] > 0
    assert cells[0::3] == ["news", "code"] and all(cells[1::3])
    assert not [entry for entry in logs if entry.get("level") == "SEVERE"]
