"""A real browser for the live page's tests: Debian's Chromium and ChromeDriver driven by selenium.

Nothing is downloaded: the browser and the driver are the system's (`apt-get install chromium
chromium-driver`, which `.ci/run` does where they are missing), selenium's own driver manager is told to
stay offline. Where they are absent the tests skip with that reason, unless LIFECYCLE_REQUIRE_BROWSER=1
(set by `.ci/run`), where their absence fails the run.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("LIFECYCLE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("LIFECYCLE_CHROMEDRIVER", "/usr/bin/chromedriver")


def missing() -> str | None:
    """Why no browser can run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not Path(path).exists() and not shutil.which(path):
            return f"{path} not found: apt-get install {package}"
    return None


def require() -> None:
    reason = missing()
    if reason is None:
        return
    if os.environ.get("LIFECYCLE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"LIFECYCLE_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


def chrome(user_data_dir: Path, width: int = 1400, height: int = 1100) -> Any:
    """A headless Chromium with a new, empty profile; the flags keep it off the network (this machine's
    network is closed: without them Chromium keeps trying Google's hosts)."""
    os.environ.setdefault("SE_OFFLINE", "true")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", "--disable-extensions", f"--window-size={width},{height}",
                 f"--user-data-dir={user_data_dir}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
