"""Simulation designs with a known answer: which representation coordinates directly modify the effect.

Design 1 — synthetic entangled representation (after Cadei et al. 2026, controlled experiments)::

    U ~ N(0, I_2)                       two latent effect modifiers
    Z = U A' + E,  E_jk ~ N(0, s_j^2)   m + 2 coordinates; A is (m + 2) x 2
    T ~ complete randomization          exactly round(n * treated_share) treated
    tau(U) = base + effect (w1 U1 + w2 U2) [+ effect * quad * (U1^2 - 1)]
    Y = mu0(U) + T tau(U) + N(0, noise_sd^2)            (gaussian)
    P(Y = 1 | U, T) = p0(U) + T * 0.2 tanh(tau(U))      (binary; additive on the probability scale)

Two *aligned* coordinates load on one latent each with loading 1 (plus an optional small ``cross`` loading on the
other latent) and small noise ``aligned_sd``; the m *leaky proxies* load on both latents with loadings drawn from
U(-(1 - margin), 1 - margin) and noise ``proxy_sd``. So every aligned loading exceeds every proxy loading on its
latent by at least ``margin``. Columns are shuffled per seed (the truth is not at a fixed index, and NEXIS' tie rule
"smallest index wins" cannot favour it). Ground truth: the two aligned coordinates.

Every proxy is marginally associated with tau (it loads on U), so marginal screening flags proxies as power grows;
given the aligned coordinates a proxy adds only the little it knows about the aligned coordinates' noise
(``aligned_sd``), which is what NEXIS' conditional tests and its relative stopping rule (rho) exploit.

The null design (``effect = 0``, ``quad = 0``) has a constant effect ``base``: no coordinate modifies the effect,
so any selection is a family-wise error.

Design 2 (semi-synthetic real text through embed -> SAE) is in ``text.py``.
"""
from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass
from typing import Any, Dict

import numpy as np

DESIGNS = ("linear", "quadratic", "null")
OUTCOMES = ("gaussian", "binary")
SQRT_2_OVER_PI = float(np.sqrt(2.0 / np.pi))


@dataclass(frozen=True)
class EntangledDesign:
    """Parameters of design 1 (see the module docstring); ``kind='null'`` forces effect = quad = 0."""

    kind: str = "linear"            # linear | quadratic | null
    outcome: str = "gaussian"       # gaussian | binary
    n: int = 2000
    m: int = 50                     # leaky proxies (the representation has m + 2 coordinates)
    effect: float = 0.5             # heterogeneity scale
    quad: float = 1.0               # quadratic design: weight of U1^2 - 1 (relative to effect)
    base: float = 0.2               # average effect
    w: tuple = (1.0, -1.0)          # effect weights of U1, U2
    mu_coef: tuple = (0.5, 0.5)     # prognostic mu0(U) = mu_coef . U
    noise_sd: float = 1.0
    aligned_sd: float = 0.2
    cross: float = 0.0              # loading of an aligned coordinate on the other latent
    margin: float = 0.4
    proxy_sd: float = 1.0
    treated_share: float = 0.5

    def __post_init__(self):
        if self.kind not in DESIGNS:
            raise ValueError(f"design kind must be one of {DESIGNS}, got {self.kind!r}")
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {self.outcome!r}")
        if self.n < 20 or self.m < 0:
            raise ValueError(f"need n >= 20 and m >= 0, got n={self.n}, m={self.m}")
        if not 0 < self.margin <= 1:
            raise ValueError(f"margin must be in (0, 1], got {self.margin}")
        if abs(self.cross) > 1 - self.margin:
            raise ValueError(f"|cross| must be <= 1 - margin = {1 - self.margin:g}, got {self.cross}")
        if not 0 < self.treated_share < 1:
            raise ValueError(f"treated_share must be in (0, 1), got {self.treated_share}")

    @property
    def heterogeneity(self) -> float:
        return 0.0 if self.kind == "null" else float(self.effect)

    @property
    def quad_weight(self) -> float:
        return float(self.quad) if self.kind == "quadratic" else 0.0

    def key(self) -> str:
        """A stable text key of the design point (seeds derive from it)."""
        return "|".join(f"{k}={v}" for k, v in sorted(asdict(self).items()))

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["w"], d["mu_coef"] = list(self.w), list(self.mu_coef)
        return d


@dataclass
class Simulated:
    """One draw: observed (y, t, z), the truth (aligned column ids) and what is needed for true estimands."""

    y: np.ndarray
    t: np.ndarray
    z: np.ndarray
    truth: np.ndarray          # column ids of the aligned coordinates (order: latent 1, latent 2)
    tau: np.ndarray            # true CATE of each unit (on the outcome's scale)
    loadings: np.ndarray       # (m + 2, 2) A, in the shuffled column order
    noise_sd: np.ndarray       # (m + 2,) coordinate noise sds, shuffled order
    design: EntangledDesign


def task_seed(base_seed: int, key: str, rep: int) -> np.random.SeedSequence:
    """Seed of one repetition: the same on the driver and on any executor."""
    return np.random.SeedSequence([int(base_seed) & 0xFFFFFFFF, zlib.crc32(key.encode()), int(rep)])


def _tau_latent(d: EntangledDesign, U: np.ndarray) -> np.ndarray:
    lin = U @ np.asarray(d.w, float)
    return d.base + d.heterogeneity * lin + d.heterogeneity * d.quad_weight * (U[:, 0] ** 2 - 1.0)


def outcome_means(d: EntangledDesign, U: np.ndarray):
    """(E[Y(0) | U], tau(U)) on the outcome's scale."""
    mu = U @ np.asarray(d.mu_coef, float)
    tau = _tau_latent(d, U)
    if d.outcome == "binary":
        return 0.5 + 0.15 * np.tanh(mu), 0.2 * np.tanh(tau)
    return mu, tau


def draw_representation(d: EntangledDesign, rng: np.random.Generator):
    """Loadings A (aligned rows first, before shuffling), noise sds and the column permutation."""
    bound = 1.0 - d.margin
    A = np.empty((d.m + 2, 2))
    A[0] = (1.0, d.cross)
    A[1] = (d.cross, 1.0)
    A[2:] = rng.uniform(-bound, bound, size=(d.m, 2))
    sds = np.r_[d.aligned_sd, d.aligned_sd, np.full(d.m, d.proxy_sd)]
    perm = rng.permutation(d.m + 2)  # new column c holds old column perm[c]
    return A[perm], sds[perm], np.array([int(np.nonzero(perm == 0)[0][0]), int(np.nonzero(perm == 1)[0][0])])


def sample_units(d: EntangledDesign, A: np.ndarray, sds: np.ndarray, n: int, rng: np.random.Generator, cols=None):
    """(U, Z) for n units of a drawn representation; ``cols``: only these coordinates of Z, in that order (the
    Monte-Carlo truths need a few columns of many units, not the whole representation)."""
    A, sds = (A, sds) if cols is None else (A[np.asarray(cols, dtype=int)], sds[np.asarray(cols, dtype=int)])
    U = rng.standard_normal((n, 2))
    Z = U @ A.T + rng.standard_normal((n, A.shape[0])) * sds
    return U, Z


def simulate(d: EntangledDesign, seed) -> Simulated:
    """One repetition of design 1 (``seed``: an int or a SeedSequence)."""
    rng = np.random.default_rng(seed)
    A, sds, truth = draw_representation(d, rng)
    U, Z = sample_units(d, A, sds, d.n, rng)
    t = np.zeros(d.n)
    t[rng.permutation(d.n)[: int(round(d.n * d.treated_share))]] = 1.0
    mu0, tau = outcome_means(d, U)
    if d.outcome == "binary":
        y = (rng.uniform(size=d.n) < mu0 + t * tau).astype(float)
    else:
        y = mu0 + t * tau + d.noise_sd * rng.standard_normal(d.n)
    return Simulated(y=y, t=t, z=Z, truth=truth, tau=tau, loadings=A, noise_sd=sds, design=d)


# ---------------------------------------------------------------------------------------------- true estimands
def true_median_split_gate(d: EntangledDesign, loading: np.ndarray, sd: float) -> Dict[str, float]:
    """Population GATEs of a Gaussian-outcome design for the split of one coordinate x = a.U + s e at its median 0.

    E[U | x > 0] = a sqrt(2/pi) / sqrt(|a|^2 + s^2) by Gaussian conditioning, and E[U1^2 - 1 | x > 0] = 0 (the
    conditional variance and the squared conditional mean add back to 1), so the quadratic term has no GATE."""
    if d.outcome != "gaussian":
        raise ValueError("closed-form GATEs exist for the gaussian outcome only")
    a = np.asarray(loading, float)
    shift = d.heterogeneity * float(a @ np.asarray(d.w, float)) * SQRT_2_OVER_PI / np.sqrt(a @ a + sd ** 2)
    return {"> median": d.base + shift, "<= median": d.base - shift, "> median - <= median": 2.0 * shift}


def true_blp(d: EntangledDesign, loadings: np.ndarray, sds: np.ndarray) -> np.ndarray:
    """Best linear projection of tau(U) on the coordinates x = A U + e: [intercept, slopes...] (gaussian outcome).

    Cov(x, tau) = effect A w (the quadratic term has zero covariance with x: odd Gaussian moments), Var(x) = A A' +
    diag(s^2), and E tau = base."""
    if d.outcome != "gaussian":
        raise ValueError("closed-form projections exist for the gaussian outcome only")
    A = np.atleast_2d(np.asarray(loadings, float))
    cov_xx = A @ A.T + np.diag(np.asarray(sds, float) ** 2)
    slopes = np.linalg.solve(cov_xx, d.heterogeneity * A @ np.asarray(d.w, float))
    return np.r_[d.base, slopes]


# ---------------------------------------------------------------------------------------------- calibration designs
CALIBRATION = ("dense", "sparse", "rare", "covariates", "clusters", "nonlinear")


@dataclass(frozen=True)
class CalibrationDesign:
    """Null designs for the family-wise error of every test option (issue 13: findings 2-4). No candidate
    modifies the effect except, in ``nonlinear``, the first column; any other selection is a family-wise error.

    * ``dense``: m standard Gaussian columns; y = 0.5 t + 0.3 Σ_{j<5} z_j + N(0, 1).
    * ``sparse``: SAE-like codes — m neurons, each active in U{20..40} of n units with Exp(1) activations (finding 3;
      min_active = 20 as the identify stage); y = 0.5 t + 0.5 Σ_{j<5} z_j + N(0, 1).
    * ``rare``: as ``sparse`` with U{3..20} active units and min_active = 0 (the leverage / df guards at work).
    * ``covariates``: 5 Gaussian covariates W and m Gaussian neurons, n = 300 by default (finding 2); y = 0.5 t +
      0.3 ΣW + N(0, 1).
    * ``clusters``: G clusters; each neuron active in U{20..40} units drawn from 3-8 clusters (topics cluster by
      source), Exp(1); y = 0.5 t + u_g + t v_g + N(0, 1), u_g ~ N(0, 1), v_g ~ N(0, 0.5²): effect heterogeneity at
      the cluster level, not through Z — only a cluster-robust test is valid here.
    * ``nonlinear`` (finding 4): z_s ~ N(0, 1), z_j = 1{z_s > 1} + N(0, 0.5²), m - 2 further N(0, 1) columns;
      τ = 2·1{z_s > 1}, y = 0.5 z_s + t τ + N(0, 1). H0(j | {s}) holds: any selection other than z_s is an error.

    ``effect`` ≠ 0 (``sparse`` only) plants one modifier among the sparse neurons, for power rather than
    calibration: τ = 0.5 + effect·z_0 (neuron 0, active in U{20..40} units like the others, or in exactly
    ``modifier_active`` units when that is set); the truth is [0].
    """

    kind: str = "sparse"
    n: int = 2000
    m: int = 128
    n_covariates: int = 5
    n_clusters: int = 50
    effect: float = 0.0
    modifier_active: int = 0

    def __post_init__(self):
        if self.kind not in CALIBRATION:
            raise ValueError(f"calibration design must be one of {CALIBRATION}, got {self.kind!r}")
        if self.n < 50 or self.m < 3:
            raise ValueError(f"need n >= 50 and m >= 3, got n={self.n}, m={self.m}")
        if (self.effect or self.modifier_active) and self.kind != "sparse":
            raise ValueError(f"a planted modifier (effect != 0) exists for the sparse design only, got {self.kind!r}")
        if not 0 <= self.modifier_active <= self.n:
            raise ValueError(f"modifier_active must be in [0, n], got {self.modifier_active}")

    @property
    def min_active(self) -> int:
        return 0 if self.kind == "rare" else 20

    def key(self) -> str:
        """The seed key; ``effect`` enters only when non-zero, so the null designs keep the seeds (and the numbers)
        of the study runs in docs/validation.md."""
        fields = {k: v for k, v in asdict(self).items() if k not in ("effect", "modifier_active") or v}
        return "calibration|" + "|".join(f"{k}={v}" for k, v in sorted(fields.items()))

    def to_dict(self) -> Dict[str, Any]:
        return dict(asdict(self), family="calibration")

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "CalibrationDesign":
        return cls(**{k: v for k, v in d.items() if k != "family"})


@dataclass
class CalibrationDraw:
    y: np.ndarray
    t: np.ndarray
    z: Any                      # dense array or scipy.sparse CSR
    w: Any                      # covariates or None
    cluster: Any                # cluster ids or None
    truth: np.ndarray           # the true modifiers (nonlinear: [0]; otherwise empty)
    design: CalibrationDesign


def _sparse_codes(rng, n, m, lo, hi, pools=None):
    import scipy.sparse as sp

    rows, cols, vals = [], [], []
    for j in range(m):
        k = int(rng.integers(lo, hi + 1))
        pool = np.arange(n) if pools is None else pools[j]
        r = rng.choice(pool, size=min(k, len(pool)), replace=False)
        rows.append(r)
        cols.append(np.full(len(r), j))
        vals.append(rng.exponential(1.0, len(r)))
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, m))


def simulate_calibration(d: CalibrationDesign, seed) -> CalibrationDraw:
    """One draw of a calibration design (``seed``: an int or a SeedSequence)."""
    rng = np.random.default_rng(seed)
    n, m = d.n, d.m
    t = np.zeros(n)
    t[rng.permutation(n)[: n // 2]] = 1.0
    w = cluster = None
    truth = np.zeros(0, dtype=int)
    noise = rng.standard_normal(n)
    if d.kind == "dense":
        z = rng.standard_normal((n, m))
        y = 0.5 * t + 0.3 * z[:, :5].sum(1) + noise
    elif d.kind in ("sparse", "rare"):
        lo, hi = (20, 40) if d.kind == "sparse" else (3, 20)
        z = _sparse_codes(rng, n, m, lo, hi)
        if d.modifier_active:   # neuron 0 redrawn with a fixed number of active units
            z = z.tolil()
            z[:, 0] = 0.0
            rows = rng.choice(n, size=d.modifier_active, replace=False)
            z[rows, 0] = rng.exponential(1.0, d.modifier_active)[:, None]
            z = z.tocsr()
        y = 0.5 * t + 0.5 * np.asarray(z[:, :5].sum(1)).ravel() + noise
        if d.effect:
            y = y + d.effect * t * z[:, 0].toarray().ravel()
            truth = np.array([0])
    elif d.kind == "covariates":
        w = rng.standard_normal((n, d.n_covariates))
        z = rng.standard_normal((n, m))
        y = 0.5 * t + 0.3 * w.sum(1) + noise
    elif d.kind == "clusters":
        cluster = rng.integers(0, d.n_clusters, n)
        members = [np.nonzero(cluster == g)[0] for g in range(d.n_clusters)]
        pools = []
        for _ in range(m):
            gs = rng.choice(d.n_clusters, size=int(rng.integers(3, 9)), replace=False)
            pools.append(np.concatenate([members[g] for g in gs]))
        z = _sparse_codes(rng, n, m, 20, 40, pools)
        u, v = rng.standard_normal(d.n_clusters), 0.5 * rng.standard_normal(d.n_clusters)
        y = 0.5 * t + u[cluster] + t * v[cluster] + noise
    else:  # nonlinear
        zs = rng.standard_normal(n)
        step = (zs > 1.0).astype(float)
        z = np.column_stack([zs, step + 0.5 * rng.standard_normal(n), rng.standard_normal((n, m - 2))])
        y = 0.5 * zs + t * 2.0 * step + noise
        truth = np.array([0])
    return CalibrationDraw(y=y, t=t, z=z, w=w, cluster=cluster, truth=truth, design=d)
