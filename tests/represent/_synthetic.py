"""Synthetic data with planted sparse directions (shared by the represent tests)."""
import numpy as np


def planted_sparse(n=6000, d=24, n_atoms=32, active=3, noise=0.01, offset=0.5, seed=0):
    """X = C A + noise + offset: each row mixes ``active`` of ``n_atoms`` unit-norm atoms with weights in [1, 3]."""
    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(n_atoms, d))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    which = np.argsort(rng.random((n, n_atoms)), axis=1)[:, :active]
    codes = np.zeros((n, n_atoms))
    np.put_along_axis(codes, which, rng.uniform(1.0, 3.0, size=(n, active)), axis=1)
    x = codes @ atoms + noise * rng.normal(size=(n, d)) + offset
    return x.astype(np.float32), atoms, codes
