#!/usr/bin/env python3
"""Save a screenshot of a running dashboard: `pipenv run python scripts/screenshot.py URL OUT.png`."""

from __future__ import annotations

import shutil
import sys

from playwright.sync_api import sync_playwright


def main(url: str, out: str) -> None:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])  # fmt: skip
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(url)
        page.wait_for_function("() => document.querySelector('#graph .js-plotly-plot')?.data?.length > 0", timeout=20000)
        page.wait_for_timeout(2500)
        page.screenshot(path=out, full_page=True)
        browser.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
