"""The report as a browser shows it: a headless Chromium screenshot of the top of the page.

The report stage saves ``screenshot.png`` next to ``index.html`` (so it is logged to MLflow with the report) when
Chromium is installed (``report.screenshot``, on by default); without Chromium it logs one line and goes on. The
test suite checks the same picture (tests/report/test_render.py) and keeps a copy under ``test-artifacts/``.
"""
from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Tuple

log = logging.getLogger(__name__)

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
VIEWPORT: Tuple[int, int] = (1280, 1600)  # the first screens of the page: where the answer must be


def find_chromium() -> Optional[str]:
    """The path of a Chromium/Chrome executable on PATH, or None."""
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


def screenshot(page: Path, out: Path, size: Tuple[int, int] = VIEWPORT, timeout: float = 120.0,
               browser: Optional[str] = None) -> Path:
    """Render the local HTML file ``page`` in headless Chromium at ``size`` (width, height) and save a PNG at
    ``out``. Raises RuntimeError with the browser's last words when it fails, FileNotFoundError without one."""
    browser = browser or find_chromium()
    if browser is None:
        raise FileNotFoundError("Chromium is not installed (Debian: apt-get install -y chromium)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="t2p-chromium-") as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--disable-background-networking", "--disable-extensions", "--disable-sync", "--no-first-run",
               "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
               f"--screenshot={out}", Path(page).resolve().as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"headless Chromium failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    return out


def try_screenshot(page: Path, out: Path) -> Optional[Path]:
    """:func:`screenshot`, or None with a log line when Chromium is missing or fails (never fails a report)."""
    try:
        return screenshot(page, out)
    except FileNotFoundError as exc:
        log.info("[t2p] report: no screenshot: %s", exc)
    except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
        log.warning("report: no screenshot: %s", exc)
    return None
