"""Baseline representations for ablations, with the SAE's ``fit / encode / decode / metrics / save / load``
contract: the raw embedding dimensions, and PCA.

Why: NEXIS's conclusions are only as interpretable as the coordinates it searches over. Running the same
search on raw dimensions (dense, entangled) and on PCA components (dense, orthogonal, variance-ordered)
shows what the sparse dictionary buys.
"""
from __future__ import annotations

import json
import os

import numpy as np
import scipy.sparse as sp

from .sae import SparseAutoencoder, _check_x, reconstruction_metrics

__all__ = ["RawDimensions", "PCARepresentation", "make_representation", "load_representation", "KINDS"]

KINDS = ("sae", "raw", "pca")


class _Dense:
    """Shared plumbing for dense linear representations (codes = a linear map of x)."""

    kind = "dense"

    def _check_fitted(self):
        if not hasattr(self, "n_features_in_"):
            raise ValueError(f"this {type(self).__name__} is not fitted yet: call fit(X) or load(path) first")

    @property
    def n_latents_(self) -> int:
        return int(self._n_out)

    def scores(self, X) -> np.ndarray:
        """Dense coordinates (the 'pre-activations' used for least-activating examples)."""
        self._check_fitted()
        return self._forward(_check_x(X, self.n_features_in_))

    pre_activations = scores

    def encode(self, X) -> sp.csr_matrix:
        z = sp.csr_matrix(self.scores(X).astype(np.float32))
        z.eliminate_zeros()
        z.sort_indices()
        return z

    transform = encode

    def decode(self, Z) -> np.ndarray:
        self._check_fitted()
        Z = Z.toarray() if sp.issparse(Z) else np.asarray(Z)
        if Z.ndim != 2 or Z.shape[1] != self.n_latents_:
            raise ValueError(f"codes must be rows x {self.n_latents_}, got shape {Z.shape}")
        return self._backward(Z.astype(np.float64)).astype(np.float32)

    def metrics(self, X) -> dict:
        X = _check_x(X, getattr(self, "n_features_in_", None))
        Z = self.encode(X)
        return reconstruction_metrics(X, self.decode(Z), Z)

    def save(self, path: str) -> str:
        self._check_fitted()
        os.makedirs(path, exist_ok=True)
        np.savez(os.path.join(path, "representation.npz"), **self._arrays())
        with open(os.path.join(path, "representation.json"), "w") as f:
            json.dump({"kind": self.kind, "params": self.get_params(), "n_features_in": self.n_features_in_}, f)
        return path

    @classmethod
    def load(cls, path: str):
        with open(os.path.join(path, "representation.json")) as f:
            meta = json.load(f)
        if meta["kind"] != cls.kind:
            raise ValueError(f"{path} holds a {meta['kind']!r} representation, not {cls.kind!r}")
        obj = cls(**meta["params"])
        arrays = dict(np.load(os.path.join(path, "representation.npz")))
        obj._set_arrays(arrays, int(meta["n_features_in"]))
        return obj


class RawDimensions(_Dense):
    """The embedding's own coordinates as 'neurons' (``dims``: optional subset of column indices)."""

    kind = "raw"

    def __init__(self, dims: list[int] | None = None):
        self.dims = dims

    def get_params(self) -> dict:
        return {"dims": None if self.dims is None else [int(d) for d in self.dims]}

    def fit(self, X, y=None) -> "RawDimensions":
        X = _check_x(X)
        dims = np.arange(X.shape[1]) if self.dims is None else np.asarray(self.dims, dtype=int)
        if dims.size == 0 or dims.min() < 0 or dims.max() >= X.shape[1]:
            raise ValueError(f"dims must be indices in [0, {X.shape[1]})")
        self._set_arrays({"dims": dims}, X.shape[1])
        return self

    def _set_arrays(self, arrays, d):
        self.dims_ = np.asarray(arrays["dims"], dtype=int)
        self.n_features_in_ = int(d)
        self._n_out = len(self.dims_)

    def _arrays(self):
        return {"dims": self.dims_}

    def _forward(self, X):
        return X[:, self.dims_]

    def _backward(self, Z):
        out = np.zeros((Z.shape[0], self.n_features_in_))
        out[:, self.dims_] = Z
        return out


class PCARepresentation(_Dense):
    """Principal components (``n_components``; None -> min(rows, dim))."""

    kind = "pca"

    def __init__(self, n_components: int | None = None, seed: int = 0):
        self.n_components = n_components
        self.seed = seed

    def get_params(self) -> dict:
        return {"n_components": self.n_components, "seed": self.seed}

    def fit(self, X, y=None) -> "PCARepresentation":
        from sklearn.decomposition import PCA

        X = _check_x(X)
        if self.n_components is not None and not (1 <= int(self.n_components) <= min(X.shape)):
            raise ValueError(f"n_components must be in [1, {min(X.shape)}], got {self.n_components}")
        p = PCA(n_components=self.n_components, random_state=self.seed).fit(X.astype(np.float64))
        self._set_arrays({"components": p.components_, "mean": p.mean_,
                          "explained_variance_ratio": p.explained_variance_ratio_}, X.shape[1])
        return self

    def _set_arrays(self, arrays, d):
        self.components_ = np.asarray(arrays["components"], dtype=np.float64)
        self.mean_ = np.asarray(arrays["mean"], dtype=np.float64)
        self.explained_variance_ratio_ = np.asarray(arrays["explained_variance_ratio"])
        self.n_features_in_ = int(d)
        self._n_out = self.components_.shape[0]

    def _arrays(self):
        return {"components": self.components_, "mean": self.mean_,
                "explained_variance_ratio": self.explained_variance_ratio_}

    def _forward(self, X):
        return (X.astype(np.float64) - self.mean_) @ self.components_.T

    def _backward(self, Z):
        return Z @ self.components_ + self.mean_


def make_representation(kind: str = "sae", **params):
    """Build an unfitted representation by name: "sae" (:class:`SparseAutoencoder`), "raw", "pca"."""
    if kind == "sae":
        return SparseAutoencoder(**params)
    if kind == "raw":
        return RawDimensions(**params)
    if kind == "pca":
        return PCARepresentation(**params)
    raise ValueError(f"representation kind must be one of {KINDS}, got {kind!r}")


def load_representation(path: str):
    """Load whatever representation ``save(path)`` wrote."""
    if os.path.exists(os.path.join(path, "sae.json")):
        return SparseAutoencoder.load(path)
    if not os.path.exists(os.path.join(path, "representation.json")):
        raise ValueError(f"no saved representation in {path}")
    with open(os.path.join(path, "representation.json")) as f:
        kind = json.load(f)["kind"]
    return {"raw": RawDimensions, "pca": PCARepresentation}[kind].load(path)
