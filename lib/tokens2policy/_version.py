"""The package version, carrying the commit it was built from.

A built wheel holds ``tokens2policy/_build.py`` (written by setup.py's build step) with the version it was built
as: ``<BASE>+g<commit>`` (``.dirty`` when the work tree had uncommitted changes). A source checkout asks git for
the same string once, on first use, so a wheel in ``dist/`` can be matched to the code that runs
(``tracking.package_requirement``). Clusters that pip-install a newer build see a new version, never a stale one.
"""
from __future__ import annotations

import os
import subprocess
from functools import lru_cache
from typing import Optional

BASE = "0.1.0"


def git_version(root: str) -> Optional[str]:
    """``BASE+g<10-hex commit>[.dirty]`` for the git work tree at ``root``, or None without git."""
    try:
        sha = subprocess.run(["git", "-C", root, "rev-parse", "--short=10", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        if not sha:
            return None
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{BASE}+g{sha}" + (".dirty" if dirty else "")


@lru_cache(maxsize=1)
def version() -> str:
    try:
        from tokens2policy._build import VERSION  # type: ignore[import-not-found]

        return VERSION
    except ImportError:
        pass
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if os.path.isfile(os.path.join(checkout, "setup.py")):
        return git_version(checkout) or BASE
    return BASE
