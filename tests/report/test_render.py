"""The report in a real browser: the report stage's headless-Chromium screenshot of the top of the page.

The picture is kept as a test artifact at ``test-artifacts/report-top.png`` (repository root, git-ignored; CI keeps
that folder) and the stage logs the same file to MLflow (``report/screenshot.png``). Skipped, with one line, where
Chromium is not installed (``make setup`` installs it from Debian when run as root; else ``apt-get install -y chromium``).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from tokens2policy.report.screenshot import VIEWPORT, find_chromium

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
ANSWER_BACKGROUND = (234, 242, 251)  # .answer{background:#eaf2fb} in report.css
CI_BAR = (122, 166, 214)  # the forest plot's CI bars (#7aa6d6, report/plots.py)


def _mask(img, rgb, tol):
    return (np.abs(img - np.asarray(rgb, dtype=float)) <= tol).all(axis=2)


@pytest.mark.skipif(find_chromium() is None, reason="Chromium is not installed (apt-get install -y chromium)")
def test_the_answer_is_on_the_first_screen(full_report):
    from PIL import Image

    _, _, summary = full_report
    shot = Path(summary["screenshot"])
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / "report-top.png")
    img = np.asarray(Image.open(shot).convert("RGB"), dtype=float)
    assert img.shape[:2] == (VIEWPORT[1], VIEWPORT[0])
    # rendered, not blank: dark text on the light page
    assert (img.mean(axis=2) < 100).mean() > 0.003
    # the answer box starts near the top (below the title line) and fills much of the first screen
    answer = _mask(img, ANSWER_BACKGROUND, 3)
    rows = np.nonzero(answer.mean(axis=1) > 0.5)[0]
    assert rows.size and rows[0] < 200, "the answer section does not start at the top"
    assert answer.any(axis=1).mean() > 0.5  # the answer boxes span most of the first screen's height
    # the GATE forest plot is drawn inside the first screen, within the answer box's rows
    bars = _mask(img, CI_BAR, 12)
    assert bars.sum() > 200
    bar_rows = np.nonzero(bars.any(axis=1))[0]
    assert rows[0] < bar_rows.min() and bar_rows.max() < rows[-1]
