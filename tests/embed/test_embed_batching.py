import numpy as np
import pytest

from tokens2policy.embed.batching import padded_tokens, token_budget_batches


def test_batches_partition_indices_and_respect_budget():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 200, size=1000)
    batches = token_budget_batches(lengths, budget=2048, max_batch_size=64)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(1000))  # each index exactly once
    for b in batches:
        assert len(b) <= 64
        assert len(b) * lengths[b].max() <= 2048
        # longest first inside the sorted stream: a batch holds a contiguous length range
    widths = [lengths[b].max() for b in batches]
    assert widths == sorted(widths, reverse=True)


def test_sorting_cuts_padding_against_fixed_unsorted_batches():
    rng = np.random.default_rng(1)
    lengths = np.concatenate([rng.integers(5, 20, 900), rng.integers(150, 256, 100)])
    rng.shuffle(lengths)
    sorted_batches = token_budget_batches(lengths, budget=4096, max_batch_size=32)
    unsorted = [np.arange(i, min(i + 32, len(lengths))) for i in range(0, len(lengths), 32)]
    useful = int(lengths.sum())
    assert padded_tokens(lengths, sorted_batches) < 1.15 * useful  # measured 1.11
    assert padded_tokens(lengths, unsorted) > 3 * useful


def test_oversized_item_is_a_singleton_and_empty_input():
    batches = token_budget_batches([10, 5000, 10], budget=100)
    assert [len(b) for b in batches] == [1, 2] and batches[0].tolist() == [1]
    assert token_budget_batches([], budget=100) == []


@pytest.mark.parametrize("kw", [{"budget": 0}, {"budget": 10, "max_batch_size": 0}])
def test_invalid_arguments(kw):
    with pytest.raises(ValueError):
        token_budget_batches([1, 2], **kw)
