"""Neuron interpretation: log-odds against a direct implementation, redaction, extremes, BBC topic labels."""
import math

import numpy as np
import pytest
import scipy.sparse as sp

from tokens2policy.represent.labels import (TermContrast, extreme_rows, label_neurons, log_odds_z, redact,
                                            snippet, top_tokens)


def test_log_odds_matches_monroe_formula_word_by_word():
    ya = np.array([10, 0, 3, 50.0])
    yb = np.array([5, 20, 3, 400.0])
    prior = np.array([1.0, 2.0, 0.5, 10.0])
    z = log_odds_z(ya, yb, prior)
    a0, na, nb = prior.sum(), ya.sum(), yb.sum()
    for w in range(4):
        d = (math.log((ya[w] + prior[w]) / (na + a0 - ya[w] - prior[w]))
             - math.log((yb[w] + prior[w]) / (nb + a0 - yb[w] - prior[w])))
        assert z[w] == pytest.approx(d / math.sqrt(1 / (ya[w] + prior[w]) + 1 / (yb[w] + prior[w])))
    assert z[0] > 0 > z[1]  # over- vs under-represented in group a


def test_term_contrast_finds_the_planted_group_vocabulary():
    rng = np.random.default_rng(0)
    common = ["market", "people", "report", "week", "city", "money", "plan", "team", "world", "group"]
    special = ["volcano", "lava", "eruption"]
    texts = []
    for i in range(200):
        words = list(rng.choice(common, size=30))
        if i < 20:
            words += list(rng.choice(special, size=6))
        texts.append(" ".join(words))
    tc = TermContrast(min_df=2).fit(texts)
    member = sp.csr_matrix((np.ones(20), (np.zeros(20, int), np.arange(20))), shape=(1, 200))
    terms = [t for t, _ in tc.top_terms(member, n_terms=5)[0]]
    assert set(terms[:3]) == set(special)


def test_redaction_patterns():
    text = "Contact John Smith at john.smith@example.com or call 020 7946 0958; Dr Jones paid 1,200 pounds."
    r = redact(text)
    assert "@" not in r and "john" not in r.lower() and "Smith" not in r and "Jones" not in r
    assert not any(ch.isdigit() for ch in r)
    assert "[EMAIL]" in r and "[NAME]" in r and "[NUM]" in r
    assert redact("The market rose.") == "The market rose."
    assert redact("In Asia prices fell") == "In Asia prices fell"  # one capitalised word after a function word


def test_snippet_is_short_and_word_bounded():
    s = snippet("word " * 100, 30)
    assert len(s) <= 32 and s.endswith("…") and "wor …" not in s


def test_extreme_rows_streaming_equals_full_sort():
    rng = np.random.default_rng(1)
    s = rng.normal(size=(103, 7)).astype(np.float32)
    ti, tv, bi, bv = extreme_rows((s[a:a + 10] for a in range(0, 103, 10)), 4)
    np.testing.assert_array_equal(ti, np.argsort(-s, axis=0)[:4].T)
    np.testing.assert_array_equal(bi, np.argsort(s, axis=0)[:4].T)
    np.testing.assert_allclose(tv, -np.sort(-s, axis=0)[:4].T)


def test_top_tokens_are_distinct_and_ordered():
    tokens = ["goal", "match", "goal", "vote", "match"]
    codes = sp.csr_matrix(np.array([[3.0, 0], [1.0, 0], [2.0, 0], [0, 5.0], [0.5, 0]]))
    out = top_tokens(codes, tokens, n=5)
    assert out[0] == [("goal", 3.0), ("match", 1.0)]
    assert out[1] == [("vote", 5.0)]


def test_label_neurons_structure_and_redaction():
    texts = ["Mary Jones scored a goal in the football match", "football match goal striker",
             "election vote parliament minister", "minister vote election email me at a@b.com"] * 5
    ids = [f"u{i}" for i in range(20)]
    codes = sp.csr_matrix(np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.5], [0.0, 0.5]] * 5))
    scores = codes.toarray() - 1.0
    out = label_neurons(codes, texts, ids, scores=scores, n_top_docs=10, n_examples=3, min_df=1)
    assert [o["neuron"] for o in out] == [0, 1]
    assert set(out[0]["label"].split(", ")) & {"football", "match", "goal", "striker"}
    assert set(out[1]["label"].split(", ")) & {"election", "vote", "minister", "parliament"}
    assert out[0]["top_docs"][0]["activation"] == 2.0 and out[0]["top_docs"][0]["unit_id"] == "u1"
    assert all(d["activation"] == -1.0 for d in out[0]["bottom_docs"])
    stored = repr(out)
    assert "Mary" not in stored and "a@b.com" not in stored
    with pytest.raises(ValueError, match="rows"):
        label_neurons(codes, texts[:3], ids, n_top_docs=2)


@pytest.fixture(scope="session")
def bbc():
    from ._bbc import bbc_corpus, bbc_embeddings

    texts, topics, ids = bbc_corpus()
    return texts, topics, ids, bbc_embeddings(texts, ids)


@pytest.mark.slow
def test_bbc_every_topic_has_a_neuron_labelled_with_its_typical_terms(bbc):
    from tokens2policy.represent.sae import SparseAutoencoder

    texts, topics, ids, emb = bbc
    assert len(set(topics)) == 5
    sae = SparseAutoencoder(n_latents=128, k=8, epochs=60, batch_size=64, lr=2e-3, seed=0, num_threads=1).fit(emb)
    codes = sae.encode(emb)
    labels = label_neurons(codes, texts, ids, scores=sae.scores(emb), n_top_docs=20, n_terms=8,
                           label_terms=5, redact_text=False)
    # topic-typical terms from the data: top log-odds terms of each topic's documents against the rest
    tc = TermContrast().fit(texts)
    names = sorted(set(topics))
    member = sp.csr_matrix(np.array([topics == t for t in names], dtype=float))
    typical = {t: {w for w, _ in terms} for t, terms in zip(names, tc.top_terms(member, n_terms=30))}
    for t in names:
        hits = [(len(set(lab["label"].split(", ")) & typical[t]), lab["label"]) for lab in labels]
        best = max(hits)
        print(t, "->", best)
        assert best[0] >= 2, f"no neuron label carries two typical '{t}' terms; best: {best}"
