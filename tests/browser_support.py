"""Headless Chromium for the tests that read the built book: one driver, no network.

Pages are opened over ``file://`` from ``$CAPSUTIL_BOOK_HTML`` (by default ``_build/html``) with
every network name unresolvable. When the book has not been built, or Chromium, chromedriver or
selenium is missing, a test skips, saying why, or fails instead where
``CAPSUTIL_REQUIRE_BROWSER=1`` (as in CI); nothing is installed.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BOOK_HTML = Path(os.environ.get("CAPSUTIL_BOOK_HTML", ROOT / "_build" / "html"))
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--host-resolver-rules=MAP * ~NOTFOUND"]
REQUIRED = os.environ.get("CAPSUTIL_REQUIRE_BROWSER", "").strip().lower() in {"1", "true", "yes"}


def unavailable(reason: str) -> None:
    """Skip with ``reason``, or fail with it where the browser tests are required."""
    if REQUIRED:
        pytest.fail(f"CAPSUTIL_REQUIRE_BROWSER is set, but {reason}", pytrace=False)
    pytest.skip(reason)


def built_page(relative: str) -> Path:
    """A page of the built book, or skip/fail when the book has not been built."""
    page = BOOK_HTML / relative
    if not page.is_file():
        unavailable(f"{page} not found: build the book first (jupyter-book build .), or set "
                    f"CAPSUTIL_BOOK_HTML to a built book's _build/html")
    return page


def _executable(*names: str) -> str | None:
    return next((path for path in map(shutil.which, names) if path), None)


@contextlib.contextmanager
def chromium(width: int = 1280, height: int = 1000):
    """A selenium driver for headless Chromium at ``width`` x ``height`` that keeps the
    browser console's messages (``driver.get_log("browser")``)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        unavailable("selenium is not installed (pip install selenium)")
    binary, driver_path = _executable("chromium", "chromium-browser", "google-chrome"), \
        _executable("chromedriver")
    if binary is None or driver_path is None:
        unavailable("no Chromium with chromedriver on this machine "
                    "(Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    with tempfile.TemporaryDirectory(prefix="capsutil-chromium-") as profile:
        for flag in FLAGS + [f"--window-size={width},{height}", f"--user-data-dir={profile}"]:
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=Service(driver_path))
        try:
            driver.set_page_load_timeout(30)
            yield driver
        finally:
            driver.quit()
