"""The embed stage: pre-treatment text → document vectors (``embeddings``) and sampled token states
(``token_states``), on Spark with a once-per-worker model cache. See ``docs/embed.md``.

Light imports only: the model code (torch, sentence-transformers) loads when it is used.
"""
from tokens2policy.embed.batching import token_budget_batches
from tokens2policy.embed.models import (
    EmbeddingModel,
    EncodedBatch,
    ModelSpec,
    TextEmbeddingModel,
    TokenStates,
    resolve_model,
)

__all__ = [
    "EmbeddingModel",
    "EncodedBatch",
    "ModelSpec",
    "TextEmbeddingModel",
    "TokenStates",
    "resolve_model",
    "token_budget_batches",
]
