"""Labelling counts and redacts each distinct text once: the labels must be exactly those of the plain per-unit
computation (CountVectorizer over every unit's text, redact() per unit), on a corpus where units share texts."""
import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.feature_extraction.text import CountVectorizer

from tokens2policy.represent import labels
from tokens2policy.represent.labels import TermContrast, label_neurons, redact


def _plain_fit(self, texts):
    """The previous TermContrast.fit, verbatim: sklearn over all texts, duplicates included."""
    n = len(texts)
    vec = CountVectorizer(lowercase=True, stop_words="english", token_pattern=r"(?u)\b[a-zA-Z]{3,}\b",
                          min_df=min(self.min_df, max(1, n)), max_features=self.max_features,
                          preprocessor=lambda t: labels._PLACEHOLDER.sub(" ", str(t or "")).lower())
    try:
        self.doc_term_ = vec.fit_transform(list(texts)).tocsr().astype(np.float64)
    except ValueError:
        self.doc_term_ = sp.csr_matrix((n, 0))
        self.terms_ = np.array([], dtype=object)
        self.total_ = np.zeros(0)
        self.prior_ = np.zeros(0)
        return self
    self.terms_ = np.asarray(vec.get_feature_names_out(), dtype=object)
    self.total_ = np.asarray(self.doc_term_.sum(axis=0)).ravel()
    self.prior_ = np.maximum(self.prior_scale * self.total_, 1e-3)
    return self


@pytest.fixture(scope="module")
def corpus():
    """600 units reading 90 BBC articles (skewed: some articles are read by many units), plus odd texts."""
    from tokens2policy.ingest.demo import load_bbc_articles

    arts = load_bbc_articles()["text"].tolist()[::25][:90]
    rng = np.random.default_rng(3)
    pick = np.minimum(rng.geometric(0.04, 600) - 1, len(arts) - 1)
    texts = [arts[i] for i in pick]
    texts[5] = texts[77] = ""  # empty texts and a numbers-only one
    texts[9] = "2004 2005 12.5%"
    return texts


@pytest.mark.parametrize("min_df,max_features", [(3, 30000), (1, None), (5, 400), (0.02, 57), (3, 1)])
def test_term_counts_equal_count_vectorizer_over_all_units(corpus, min_df, max_features):
    clean = [redact(t) for t in corpus]
    got = TermContrast(min_df=min_df, max_features=max_features).fit(clean)
    ref = _plain_fit(TermContrast(min_df=min_df, max_features=max_features), clean)
    assert got.terms_.tolist() == ref.terms_.tolist()
    assert (got.doc_term_ != ref.doc_term_).nnz == 0 and got.doc_term_.shape == ref.doc_term_.shape
    assert np.array_equal(got.prior_, ref.prior_)
    if max_features is not None and max_features < 1000:  # the corpus-count cut (with its ties) was exercised
        assert len(got.terms_) == max_features


def test_empty_corpus_and_nothing_left_after_pruning():
    for texts in ([], ["", "  "], ["one words here", "other terms there"]):  # last: every df = 1 < min_df = 2
        got = TermContrast(min_df=2).fit(texts)
        ref = _plain_fit(TermContrast(min_df=2), texts)
        assert got.terms_.tolist() == ref.terms_.tolist() == [] and got.doc_term_.shape == ref.doc_term_.shape


def test_labels_identical_to_the_plain_per_unit_computation(corpus, monkeypatch):
    n, m = len(corpus), 24
    rng = np.random.default_rng(0)
    dense = rng.normal(size=(n, m)).astype(np.float32)
    top = np.argpartition(-dense, 4, axis=1)[:, :4]
    rows = np.repeat(np.arange(n), 4)
    codes = sp.csr_matrix((np.abs(dense[rows, top.ravel()]) + 0.01, (rows, top.ravel())), shape=(n, m))
    tokens = [w for t in corpus[:40] for w in t.split()[:30]]
    tok_codes = sp.random(len(tokens), m, density=0.2, format="csr", random_state=2, dtype=np.float32)
    ids = [f"e/u{i}" for i in range(n)]
    kw = dict(scores=dense, token_codes=tok_codes, tokens=tokens, n_top_docs=15, n_examples=4)

    got = label_neurons(codes, corpus, ids, **kw)
    monkeypatch.setattr(labels.TermContrast, "fit", _plain_fit)
    monkeypatch.setattr(labels, "_map_distinct", lambda fn, items: [fn(x) for x in items])
    ref = label_neurons(codes, corpus, ids, **kw)
    assert got == ref
    assert sum(bool(r["label"]) for r in got) >= m // 2  # real labels were compared, not empty ones
