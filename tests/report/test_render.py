"""The report renders in a real browser: headless Chromium screenshots the page (skipped only without Chromium)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.skipif(chromium() is None, reason="Chromium is not installed (Debian: apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(full_report, tmp_path):
    from PIL import Image

    _, _, summary = full_report
    index = Path(summary["report_path"])
    shot = tmp_path / "report.png"
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--disable-background-networking", "--disable-extensions", "--disable-sync", "--no-first-run",
           "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,3000",
           f"--screenshot={shot}", index.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB"), dtype=float)
    assert img.shape[:2] == (3000, 1200)
    # Rendered content, not a blank page: the page background is #f6f7f9, the text and figures are dark.
    dark = (img.mean(axis=2) < 100).mean()
    assert dark > 0.002, f"only {dark:.4%} dark pixels: the page did not render"
    # the styles applied: heading rules and card borders in the report's blue (#1f4e79)
    blue = ((np.abs(img - np.array([31, 78, 121])) < 25).all(axis=2)).sum()
    assert blue > 500
