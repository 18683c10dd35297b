"""TopK SAE: planted-dictionary recovery, exact encode/decode against a numpy reference, persistence."""
import numpy as np
import pytest
import scipy.sparse as sp

from tokens2policy.represent.sae import (SAEParams, SparseAutoencoder, csr_to_rows, reconstruction_metrics,
                                         rows_to_csr)

from ._synthetic import planted_sparse


@pytest.fixture(scope="module")
def planted():
    x, atoms, codes = planted_sparse(n=6000, d=24, n_atoms=32, active=3, seed=1)
    sae = SparseAutoencoder(n_latents=96, k=3, epochs=12, batch_size=128, lr=4e-3, seed=0, num_threads=1).fit(x)
    return x, atoms, codes, sae


def test_recovers_every_planted_atom(planted):
    x, atoms, _, sae = planted
    # normalization is a shift and a positive isotropic scale, so planted directions are unchanged in the SAE's space
    cos = atoms @ sae.dictionary_.T
    best = cos.max(axis=1)
    assert best.min() >= 0.9, f"worst planted atom matched at cosine {best.min():.3f}"


def test_codes_are_topk_and_match_the_planted_support(planted):
    x, atoms, codes, sae = planted
    z = sae.encode(x)
    assert isinstance(z, sp.csr_matrix) and z.shape == (x.shape[0], 96)
    assert np.diff(z.indptr).max() <= 3
    # name each active latent by its nearest planted atom; the named sets should equal the planted supports
    nearest = (sae.dictionary_ @ atoms.T).argmax(axis=1)
    true_support = [set(np.flatnonzero(r)) for r in codes]
    found_support = [set(nearest[z.indices[a:b]]) for a, b in zip(z.indptr[:-1], z.indptr[1:])]
    # share of planted (row, atom) activations that the codes recover; chance level is active/n_atoms ~ 0.09
    recall = np.mean([len(t & f) / len(t) for t, f in zip(true_support, found_support)])
    assert recall >= 0.9, recall


def test_decoder_atoms_have_unit_norm(planted):
    norms = np.linalg.norm(planted[3].dictionary_, axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)


def _numpy_reference(sae, x):
    """Straightforward numpy TopK SAE forward pass from the stored weights."""
    st = {k: v.detach().numpy().astype(np.float64) for k, v in sae.module_.state_dict().items()}
    xn = (x - st["mean"]) / st["scale"]
    pre = (xn - st["b_pre"]) @ st["W_enc"] + st["b_enc"]
    z = np.zeros_like(pre)
    top = np.argsort(-pre, axis=1)[:, :sae.k]
    np.put_along_axis(z, top, np.maximum(np.take_along_axis(pre, top, axis=1), 0), axis=1)
    xh = (z @ st["W_dec"] + st["b_pre"]) * st["scale"] + st["mean"]
    return z, xh


def test_encode_decode_match_numpy_reference(planted):
    x, _, _, sae = planted
    z_ref, xh_ref = _numpy_reference(sae, x[:500].astype(np.float64))
    z = sae.encode(x[:500])
    np.testing.assert_allclose(z.toarray(), z_ref, atol=1e-4)
    np.testing.assert_allclose(sae.decode(z), xh_ref, atol=1e-4)
    np.testing.assert_allclose(sae.decode(z.toarray()), xh_ref, atol=1e-4)


def test_metrics_match_direct_formulas(planted):
    x, _, _, sae = planted
    m = sae.metrics(x)
    z = sae.encode(x).toarray()
    xh = sae.decode(z).astype(np.float64)
    xd = x.astype(np.float64)
    assert m["normalized_mse"] == pytest.approx(((xd - xh) ** 2).sum() / (xd ** 2).sum(), rel=1e-6)
    fve = 1 - ((xd - xh) ** 2).sum() / ((xd - xd.mean(0)) ** 2).sum()
    assert m["fraction_variance_explained"] == pytest.approx(fve, rel=1e-6)
    assert m["dead_fraction"] == pytest.approx(np.mean(~(z != 0).any(0)))
    assert m["mean_l0"] == pytest.approx((z != 0).sum(1).mean())
    assert m["fraction_variance_explained"] > 0.9


def test_save_load_round_trip(planted, tmp_path):
    x, _, _, sae = planted
    sae.save(str(tmp_path / "m"))
    back = SparseAutoencoder.load(str(tmp_path / "m"))
    assert back.k == sae.k and back.n_latents_ == sae.n_latents_
    np.testing.assert_array_equal(back.encode(x[:200]).toarray(), sae.encode(x[:200]).toarray())
    np.testing.assert_allclose(back.module_.mean.numpy(), sae.module_.mean.numpy())


def test_sparse_rows_round_trip():
    rng = np.random.default_rng(0)
    dense = rng.random((50, 40)) * (rng.random((50, 40)) < 0.1)
    dense[3] = 0  # an empty row
    idx, val = csr_to_rows(sp.csr_matrix(dense))
    assert all(np.all(np.diff(i) > 0) for i in idx)
    np.testing.assert_allclose(rows_to_csr(idx, val, 40).toarray(), dense.astype(np.float32))
    with pytest.raises(ValueError, match="out of range"):
        rows_to_csr([[40]], [[1.0]], 40)


@pytest.mark.parametrize("kwargs,msg", [({"k": 0}, "k must be"), ({"epochs": 0}, "epochs"),
                                        ({"n_latents": 4, "k": 8}, "exceeds")])
def test_bad_params_are_one_line_errors(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        SparseAutoencoder(**kwargs).fit(np.random.default_rng(0).random((20, 4)))


def test_input_validation():
    sae = SparseAutoencoder(n_latents=8, k=2, epochs=1)
    with pytest.raises(ValueError, match="not fitted"):
        sae.encode(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="NaN"):
        sae.fit(np.array([[1.0, np.nan], [0.0, 1.0]]))
    sae.fit(np.random.default_rng(0).random((40, 3)))
    with pytest.raises(ValueError, match="columns"):
        sae.encode(np.zeros((2, 4)))


def test_reconstruction_metrics_on_perfect_and_zero_reconstruction():
    x = np.random.default_rng(0).normal(size=(30, 5)) + 2
    m = reconstruction_metrics(x, x, sp.csr_matrix(np.eye(30, 7)))
    assert m["normalized_mse"] == 0 and m["fraction_variance_explained"] == 1
    assert m["dead_fraction"] == 0 and m["mean_l0"] == pytest.approx(7 / 30)
    m0 = reconstruction_metrics(x, np.zeros_like(x), np.zeros((30, 7)))
    assert m0["normalized_mse"] == pytest.approx(1.0) and m0["dead_fraction"] == 1.0


def _one_of_many_features(n=3000, d=64, n_features=32, seed=0):
    """Each row is one of ``n_features`` orthonormal directions with a weight in [1, 3] (+ small noise)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(d, n_features)))
    feats = q.T
    x = rng.uniform(1, 3, size=(n, 1)) * feats[rng.integers(n_features, size=n)] + 0.01 * rng.normal(size=(n, d))
    return x.astype(np.float32), feats


def test_aux_loss_revives_dead_latents():
    """One latent per feature and k=1: at the random init some latents are the best match of two features and others
    of none, so the latter are never selected -- dead -- and, without the auxiliary loss, get no gradient and stay
    dead while two features share one atom. The aux loss trains the dead latents on the live model's residual (the
    unexplained feature), after which they win it and fire again (Gao et al. 2024, sec. A.2)."""
    x, feats = _one_of_many_features()
    kw = dict(n_latents=32, k=1, epochs=10, batch_size=64, lr=4e-3, seed=0, dead_after=256, num_threads=1)
    off = SparseAutoencoder(aux_k=0, **kw).fit(x)
    on = SparseAutoencoder(aux_k=4, **kw).fit(x)
    m_off, m_on = off.metrics(x), on.metrics(x)
    print(f"dead fraction: aux off {m_off['dead_fraction']:.3f}, on {m_on['dead_fraction']:.3f}; "
          f"train history (on) {[round(h['dead_fraction_train'], 3) for h in on.history_]}")
    # the setup does produce dead latents: after the first epoch, with or without the aux loss
    assert off.history_[0]["dead_fraction_train"] >= 0.1 and on.history_[0]["dead_fraction_train"] >= 0.1
    assert m_off["dead_fraction"] >= 3 / 32  # and without the aux loss they stay dead
    # with it most of them fire again, and the revived latents take the features that were merged
    assert on.history_[-1]["dead_fraction_train"] <= on.history_[0]["dead_fraction_train"] / 2
    assert m_on["dead_fraction"] <= m_off["dead_fraction"] / 2
    covered = lambda sae: int(((feats @ sae.dictionary_.T).max(axis=1) > 0.9).sum())
    assert covered(on) > covered(off)
    assert m_on["normalized_mse"] < m_off["normalized_mse"] / 2


def _hierarchical(n=3000, d=24, n_coarse=4, n_fine=24, seed=3):
    """Each row: one of ``n_coarse`` coarse atoms (weight 2-3) plus 2 of ``n_fine`` fine atoms (weight 0.5-1).
    Returns (x, the row's coarse atom, the fine atoms)."""
    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(n_coarse + n_fine, d))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    codes = np.zeros((n, n_coarse + n_fine))
    group = rng.integers(0, n_coarse, n)
    codes[np.arange(n), group] = rng.uniform(2.0, 3.0, n)
    fine = n_coarse + np.argsort(rng.random((n, n_fine)), axis=1)[:, :2]
    np.put_along_axis(codes, fine, rng.uniform(0.5, 1.0, (n, 2)), axis=1)
    return (codes @ atoms + 0.01 * rng.normal(size=(n, d))).astype(np.float32), group, atoms[n_coarse:]


def _prefix_fve(sae, x, m):
    z = sae.encode(x).toarray()
    z[:, m:] = 0
    xh = sae.decode(z)
    return 1 - ((x - xh) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()


def test_matryoshka_prefix_learns_the_coarse_atoms_and_keeps_the_fine_ones(tmp_path):
    x, group, fine = _hierarchical()
    common = dict(n_latents=64, k=3, epochs=10, batch_size=128, lr=4e-3, seed=0, num_threads=1)
    nested = SparseAutoencoder(matryoshka=(8,), **common).fit(x)
    plain = SparseAutoencoder(**common).fit(x)
    # the first 8 latents must reconstruct alone: every coarse group has one of them as its own latent (active on
    # >= 90 % of the group's rows, and those rows >= 90 % of its activations)
    z = nested.encode(x).toarray()[:, :8] > 0
    onehot = np.eye(4)[group]
    hits = z.T.astype(float) @ onehot                                   # latent x group
    precision = hits / np.maximum(z.sum(0), 1)[:, None]
    recall = hits / onehot.sum(0)[None, :]
    assert ((precision > 0.9) & (recall > 0.9)).any(axis=0).all(), (precision, recall)
    assert _prefix_fve(nested, x, 8) > 0.7 > _prefix_fve(plain, x, 8)
    # the fine atoms are matched as well as by the plain dictionary, which reconstructs about as well overall
    best = lambda sae: (fine @ sae.dictionary_.T).max(axis=1).mean()  # noqa: E731
    assert best(nested) > best(plain) - 0.05
    assert nested.metrics(x)["fraction_variance_explained"] > plain.metrics(x)["fraction_variance_explained"] - 0.05
    # the nesting is part of the saved model
    nested.save(str(tmp_path / "m"))
    back = SparseAutoencoder.load(str(tmp_path / "m"))
    assert back.matryoshka == (8,) and back.module_.prefixes == (8,)
    np.testing.assert_array_equal(back.encode(x[:100]).toarray(), nested.encode(x[:100]).toarray())


@pytest.mark.parametrize("prefixes,msg", [((8, 4), "increasing"), ((0,), "increasing"), ((64,), "smaller than")])
def test_matryoshka_prefixes_are_checked(prefixes, msg):
    with pytest.raises(ValueError, match=msg):
        SparseAutoencoder(n_latents=64, k=2, epochs=1, matryoshka=prefixes).fit(
            np.random.default_rng(0).random((40, 4)))


def test_dictionary_size_from_the_corpus():
    from tokens2policy.represent.sae import latents_for_corpus

    # the demo corpus: 2,225 distinct articles, k = 8, >= 100 documents per latent on average -> 128
    assert latents_for_corpus(2225, 8, 100, 3072) == 128
    assert 2225 * 8 / 128 >= 100 > 2225 * 8 / 256
    assert latents_for_corpus(979, 8, 100, 3072) == 64          # the drug-review corpus
    assert latents_for_corpus(10 ** 6, 8, 100, 3072) == 3072     # capped at expansion x dim
    assert latents_for_corpus(50, 8, 100, 3072) == 16            # floor max(2k, 16)
    with pytest.raises(ValueError, match="positive"):
        latents_for_corpus(0, 8, 100, 3072)


def test_stage_resolves_the_dictionary_size_from_distinct_texts(spark, make_cfg):
    from tokens2policy.represent.job import resolve_n_latents

    # 3,000 units reading 500 distinct texts (the demo's situation: many readers per article)
    rows = [(f"u{i}", f"h{i % 500}", 24) for i in range(3000)]
    emb = spark.createDataFrame(rows, "unit_id string, content_hash string, dim int")
    cfg = make_cfg("represent.n_latents=null", "represent.k=8", "represent.docs_per_latent=50")
    assert resolve_n_latents(cfg, emb) == 64                 # 500 * 8 / 50 = 80 -> 64 (not 3000 * 8 / 50)
    assert resolve_n_latents(make_cfg("represent.n_latents=100"), emb) == 100        # an explicit size wins
    assert resolve_n_latents(make_cfg("represent.n_latents=null", "represent.docs_per_latent=null"), emb) is None


def test_prefixes_that_do_not_fit_a_data_sized_dictionary_are_dropped():
    from tokens2policy.represent.job import nested_prefixes

    assert nested_prefixes([16, 64], 128) == (16, 64)
    assert nested_prefixes([16, 64], 64) == (16,)        # e.g. the 979-review corpus: 64 latents
    assert nested_prefixes([16, 64], None) == (16, 64)


def test_small_sae_trains_on_one_thread_by_default_and_restores_torch_threads():
    """num_threads=None: a small step (batch x d x n_latents <= SMALL_STEP) trains on one thread (thread
    synchronisation costs more than it gains there: docs/benchmarks.md), and torch's setting is restored."""
    import torch

    from tokens2policy.represent.sae import SMALL_STEP, SAEParams, train_loop

    before = torch.get_num_threads()
    seen = []
    x = np.random.default_rng(0).normal(size=(300, 16)).astype(np.float32)
    p = SAEParams(n_latents=32, k=2, epochs=1, batch_size=64, seed=0)
    assert 64 * 16 * 32 <= SMALL_STEP
    train_loop(x, p, on_epoch=lambda epoch, entry: seen.append(torch.get_num_threads()))
    assert seen == [1] and torch.get_num_threads() == before
    if before > 1:  # an explicit setting wins
        seen.clear()
        train_loop(x, SAEParams(n_latents=32, k=2, epochs=1, batch_size=64, seed=0, num_threads=before),
                   on_epoch=lambda epoch, entry: seen.append(torch.get_num_threads()))
        assert seen == [before]
