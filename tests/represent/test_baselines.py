"""Baseline representations (raw dimensions, PCA) under the same fit/encode/decode/save contract."""
import numpy as np
import pytest
import scipy.sparse as sp

from tokens2policy.represent.baselines import (PCARepresentation, RawDimensions, load_representation,
                                               make_representation)
from tokens2policy.represent.sae import SparseAutoencoder


@pytest.fixture(scope="module")
def x():
    rng = np.random.default_rng(0)
    return (rng.normal(size=(300, 3)) @ rng.normal(size=(3, 10)) + 0.01 * rng.normal(size=(300, 10))).astype(np.float32)


def test_raw_dimensions_are_the_identity(x):
    r = RawDimensions().fit(x)
    z = r.encode(x)
    assert sp.isspmatrix_csr(z) and z.shape == x.shape
    np.testing.assert_array_equal(z.toarray(), x)
    assert r.metrics(x)["normalized_mse"] == 0.0
    sub = RawDimensions(dims=[1, 4]).fit(x)
    np.testing.assert_array_equal(sub.encode(x).toarray(), x[:, [1, 4]])


def test_pca_matches_svd(x):
    p = PCARepresentation(n_components=3).fit(x)
    xc = x.astype(np.float64) - x.mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    z = p.encode(x).toarray()
    # components agree with the SVD up to sign
    signs = np.sign(np.sum(z * (xc @ vt[:3].T), axis=0))
    np.testing.assert_allclose(z * signs, xc @ vt[:3].T, atol=1e-3)
    fve = (s[:3] ** 2).sum() / (s ** 2).sum()
    assert p.metrics(x)["fraction_variance_explained"] == pytest.approx(fve, rel=1e-4)


@pytest.mark.parametrize("kind,params", [("raw", {}), ("pca", {"n_components": 4}),
                                         ("sae", {"n_latents": 16, "k": 2, "epochs": 2, "num_threads": 1})])
def test_save_load_by_kind(kind, params, x, tmp_path):
    rep = make_representation(kind, **params).fit(x)
    rep.save(str(tmp_path / kind))
    back = load_representation(str(tmp_path / kind))
    assert type(back) is type(rep)
    np.testing.assert_allclose(back.encode(x).toarray(), rep.encode(x).toarray(), atol=1e-6)
    np.testing.assert_allclose(back.decode(back.encode(x)), rep.decode(rep.encode(x)), atol=1e-5)


def test_unknown_kind_and_unfitted():
    with pytest.raises(ValueError, match="kind must be one of"):
        make_representation("ica")
    with pytest.raises(ValueError, match="not fitted"):
        PCARepresentation().encode(np.zeros((2, 2)))
    assert isinstance(make_representation("sae", k=4), SparseAutoencoder)
