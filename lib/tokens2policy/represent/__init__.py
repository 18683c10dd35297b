"""The represent stage: a TopK sparse-autoencoder dictionary over frozen text-model states (docs/represent.md).

Public API::

    SparseAutoencoder(n_latents, k, lr, epochs, batch_size, seed).fit(X).encode(X) -> csr_matrix
    train_distributed(source, params, backend="local"|"torch"|"horovod", num_processes=2, use_gpu=False)
    delta_source(spark, path_or_df) -> ParquetShards      # per-rank parquet shards of a Delta snapshot
    RawDimensions / PCARepresentation / make_representation(kind) / load_representation(path)
    label_neurons(codes, texts, unit_ids, scores=...), redact(text), log_odds_z(...)
    job.run(spark, cfg)                                    # the Spark stage

Heavy dependencies (torch, Spark, MLflow) are imported lazily.
"""
from .baselines import KINDS, PCARepresentation, RawDimensions, load_representation, make_representation
from .distributed import (BACKENDS, ArraySource, BackendUnavailableError, ParquetShards, delta_source,
                          horovod_available, train_distributed)
from .labels import TermContrast, extreme_rows, label_neurons, log_odds_z, redact, top_tokens
from .sae import SAEParams, SparseAutoencoder, csr_to_rows, reconstruction_metrics, rows_to_csr

__all__ = [
    "KINDS", "PCARepresentation", "RawDimensions", "load_representation", "make_representation",
    "BACKENDS", "ArraySource", "BackendUnavailableError", "ParquetShards", "delta_source", "horovod_available",
    "train_distributed", "TermContrast", "extreme_rows", "label_neurons", "log_odds_z", "redact", "top_tokens",
    "SAEParams", "SparseAutoencoder", "csr_to_rows", "reconstruction_metrics", "rows_to_csr",
]
