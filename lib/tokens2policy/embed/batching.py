"""Length-sorted batching by a token budget.

A transformer batch costs about ``batch_size × longest_sequence`` (every sequence is padded to the longest), so a
fixed batch *size* either wastes compute on padding (one long text among short ones) or under-fills the device on
short texts. Sorting by length and cutting batches at a *token budget* keeps padding near zero and the work per
batch roughly constant — the same idea as ``SentenceTransformer.encode``'s length sort, with a budget in place of
its fixed batch size.
"""
from __future__ import annotations

from typing import List, Sequence

import numpy as np


def token_budget_batches(lengths: Sequence[int], budget: int, max_batch_size: int = 1024) -> List[np.ndarray]:
    """Split item indices into batches whose padded size ``len(batch) × max(length)`` stays within ``budget``.

    Items are sorted by length, longest first (so a batch's first item fixes its padded width, and an out-of-memory
    error, if any, shows up in the first batch). An item longer than the budget on its own forms a singleton batch.
    Every index appears in exactly one batch.

    Parameters
    ----------
    lengths : sequence of int
        Cost of each item in tokens (sequence length after tokenization, special tokens included).
    budget : int
        Maximum padded tokens per batch, e.g. 16384.
    max_batch_size : int
        Upper bound on items per batch whatever the budget (bounds memory for very short items).

    Returns
    -------
    list of np.ndarray of int
        Index arrays into ``lengths``; concatenated they are a permutation of ``range(len(lengths))``.
    """
    if budget < 1:
        raise ValueError(f"budget must be a positive number of tokens, got {budget}")
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.ndim != 1:
        raise ValueError("lengths must be one-dimensional")
    if lengths.size == 0:
        return []
    order = np.argsort(-lengths, kind="stable")
    sorted_len = np.maximum(lengths[order], 1)
    batches: List[np.ndarray] = []
    start, n = 0, len(order)
    while start < n:
        width = int(sorted_len[start])  # longest item of this batch (sorted descending)
        size = max(1, min(max_batch_size, budget // width, n - start))
        batches.append(order[start : start + size])
        start += size
    return batches


def padded_tokens(lengths: Sequence[int], batches: Sequence[np.ndarray]) -> int:
    """Total tokens processed including padding (``Σ_batches len(batch) × max length``), for diagnostics."""
    lengths = np.asarray(lengths)
    return int(sum(len(b) * int(lengths[b].max()) for b in batches if len(b)))
