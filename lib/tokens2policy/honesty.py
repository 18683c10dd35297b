"""Sample splitting for selection-aware inference: which units select the modifiers, which units estimate effects.

NEXIS (the identify stage) picks the modifiers that look most like effect modifiers in the data; an estimate or
test computed afterwards on the SAME units is biased towards confirming the pick (a null feature chosen for its
largest |t| has a "significant" GATE most of the time). Splitting the sample removes that: the identify stage
selects on the units whose role is ``selection``; the effects and policy stages estimate everything they report
about the selected modifiers (GATEs, joint interactions, CATE final stages, calibration, policy learning and
value) on the units whose role is ``estimation`` only. Conditional on the selection units, the selected set is a
fixed, pre-specified set for the estimation units, so their usual (robust) CIs and tests keep their level
(Cox 1975; Wasserman & Roeder 2009; Athey & Imbens 2016 "honest" estimation). ``docs/effects.md`` ("Selection-aware
inference") explains the choice and its power cost.

The role is a deterministic function of ``(experiment_id, unit_id, seed)``::

    key  = first 60 bits of sha256("honesty␟<experiment_id>␟<unit_id>␟<seed>")      (uniform on [0, 2**60))
    role = "selection" if key < ⌊selection_share · 2**60⌋ else "estimation"

so it is the same on every machine, Spark version, partitioning and rerun, a stored unit never changes role when
new units arrive (the role reads nothing but the unit's own ids), and each role holds a Binomial(n, share) share
of the units (balanced by share up to O(√n), independent of treatment and of everything else about the unit).
The ``honesty`` salt keeps the key independent of the fold key of :mod:`tokens2policy.ingest.folds`, which hashes
the same ids with the fold seed.

Two twins compute it: :func:`role_column` (a pyspark ``Column`` for the jobs) and :func:`unit_roles` (numpy, for
in-memory use and tests); they are equal on every input (tested on hostile ids). Unit ids are hashed in their
string form (the ``units`` table stores them as strings; an integer id hashes as its decimal digits in both).
"""
from __future__ import annotations

import hashlib
from typing import Iterable, Optional

import numpy as np

SEP = "\u001f"
SALT = "honesty"
SELECTION, ESTIMATION, BOTH = "selection", "estimation", "both"
SCALE = float(1 << 60)  # the hash keeps 15 hex digits = 60 bits


def _parts(params):
    """(mode, selection_share, seed) from a ``HonestyConfig`` or anything with those attributes."""
    return str(params.mode), float(params.selection_share), int(params.seed)


# ---------------------------------------------------------------------------------------------------- numpy twin
def stable_key(keys: Iterable[Iterable], seed: int, salt: str = SALT) -> np.ndarray:
    """A 60-bit integer per key tuple: the first 15 hex digits of sha256("salt␟k1␟k2…␟seed")."""
    out = []
    for key in keys:
        text = SEP.join([salt, *(str(k) for k in key), str(int(seed))])
        out.append(int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:15], 16))
    return np.asarray(out, dtype=np.int64)


def stable_uniform(keys: Iterable[Iterable], seed: int, salt: str = SALT) -> np.ndarray:
    """:func:`stable_key` / 2**60: a uniform number in [0, 1) per key tuple."""
    return stable_key(keys, seed, salt).astype(np.float64) / SCALE


def share_threshold(share: float) -> int:
    """The key below which a unit is in the selection role: ⌊share · 2**60⌋ (exact: 2**60 is a power of two)."""
    return int(float(share) * SCALE)


def unit_roles(experiment_ids, unit_ids, params) -> np.ndarray:
    """Role of each unit (``selection`` / ``estimation``; ``both`` for every unit when ``params.mode == "none"``)."""
    mode, share, seed = _parts(params)
    unit_ids = list(unit_ids)
    if isinstance(experiment_ids, str) or np.ndim(experiment_ids) == 0:
        experiment_ids = [experiment_ids] * len(unit_ids)
    if mode == "none":
        return np.full(len(unit_ids), BOTH, dtype=object)
    key = stable_key(zip(experiment_ids, unit_ids), seed)
    return np.where(key < share_threshold(share), SELECTION, ESTIMATION).astype(object)


def selects(roles) -> np.ndarray:
    """Units the identify stage may use (role selection, or both)."""
    roles = np.asarray(roles, dtype=object)
    return (roles == SELECTION) | (roles == BOTH)


def estimates(roles) -> np.ndarray:
    """Units the effects and policy stages may estimate on (role estimation, or both)."""
    roles = np.asarray(roles, dtype=object)
    return (roles == ESTIMATION) | (roles == BOTH)


def estimated_on(params) -> str:
    """The ``estimated_on`` value of the summary tables: ``estimation`` (units that did not select the modifiers)
    or ``all`` (``honesty.mode=none``: the same units selected and estimated — not selection-aware)."""
    return "all" if _parts(params)[0] == "none" else ESTIMATION


def describe(params, n: Optional[int] = None) -> str:
    """One phrase for reports: which units the numbers come from."""
    count = f"{n:,} " if n is not None else ""
    if _parts(params)[0] == "none":
        return f"all {count}units, the same that selected the modifiers (honesty.mode=none: NOT selection-aware)"
    return f"{count}estimation units, none of which took part in selecting the modifiers"


# ---------------------------------------------------------------------------------------------------- Spark twin
def key_column(*cols, seed: int, salt: str = SALT):
    """Spark twin of :func:`stable_key` (a long) over the string forms of ``cols`` (column names or Columns)."""
    from pyspark.sql import functions as F

    text = F.concat_ws(SEP, F.lit(salt), *[(F.col(c) if isinstance(c, str) else c).cast("string") for c in cols],
                       F.lit(str(int(seed))))
    return F.conv(F.substring(F.sha2(text, 256), 1, 15), 16, 10).cast("long")


def role_column(params, experiment_col: str = "experiment_id", unit_col: str = "unit_id"):
    """Spark ``Column``: the role of each row's unit, equal to :func:`unit_roles`."""
    from pyspark.sql import functions as F

    mode, share, seed = _parts(params)
    if mode == "none":
        return F.lit(BOTH)
    key = key_column(experiment_col, unit_col, seed=seed)
    return F.when(key < F.lit(share_threshold(share)), F.lit(SELECTION)).otherwise(F.lit(ESTIMATION))


def selection_filter(params, experiment_col: str = "experiment_id", unit_col: str = "unit_id"):
    """Spark predicate for the identify stage: the units that select (all units when ``mode == "none"``)."""
    from pyspark.sql import functions as F

    if _parts(params)[0] == "none":
        return F.lit(True)
    return role_column(params, experiment_col, unit_col) == F.lit(SELECTION)
