"""Headless Debian chromium driven by Playwright (no browser download), for the web demo tests."""
from __future__ import annotations

import contextlib
import shutil
import socket

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def browser_page(width: int = 1400, height: int = 900):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (make test does)")
    if not shutil.which("chromium") and not shutil.os.path.exists(CHROMIUM):
        pytest.fail("chromium is not installed: apt-get install chromium (make test does)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            yield page
        finally:
            browser.close()
