"""The Spark side of embedding: an iterator-of-batches Pandas UDF with a per-worker model cache.

Why an *iterator* UDF: Spark hands one partition to one Python worker as a stream of Arrow batches; the iterator
form lets the UDF fetch the model once for the whole stream, and the module-level cache below keeps it across the
tasks that a reused Python worker (``spark.python.worker.reuse``, on by default) runs later — so the model is
loaded once per Python worker, not once per batch or per task. :data:`LOAD_COUNT` counts the loads, and
``embed.load_log`` appends one JSON line per load so a driver (or a test) can count them across workers.
"""
from __future__ import annotations

import json
import os
import socket
import time
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import pandas as pd
from pyspark.sql.functions import pandas_udf
from pyspark.sql.types import ArrayType, FloatType, IntegerType, StringType, StructField, StructType

from tokens2policy.embed.models import EmbeddingModel, EncodedBatch, ModelSpec

_MODELS: Dict[str, EmbeddingModel] = {}
LOAD_COUNT = 0

RESULT_TYPE = StructType(
    [
        StructField("vector", ArrayType(FloatType(), containsNull=False), True),
        StructField("dim", IntegerType(), True),
        StructField("status", StringType(), True),
        StructField("n_tokens", IntegerType(), True),
        StructField("positions", ArrayType(IntegerType(), containsNull=False), True),
        StructField("tokens", ArrayType(StringType(), containsNull=False), True),
        StructField("states", ArrayType(ArrayType(FloatType(), containsNull=False), containsNull=False), True),
    ]
)


def get_model(spec: ModelSpec, load_log: Optional[str] = None) -> EmbeddingModel:
    """The model for ``spec``, loaded at most once in this Python process."""
    global LOAD_COUNT
    key = spec.cache_key()
    model = _MODELS.get(key)
    if model is None:
        started = time.perf_counter()
        model = spec.load()
        _MODELS[key] = model
        LOAD_COUNT += 1
        if load_log:
            event = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "model_hash": spec.model_hash,
                "device": str(getattr(model, "device", "?")),
                "runtime": str(getattr(model, "runtime", "?")),
                "precision": str(getattr(model, "precision", "?")),
                "seconds": round(time.perf_counter() - started, 3),
                "load_count": LOAD_COUNT,
            }
            with open(load_log, "a") as fh:  # one short line per write: atomic on POSIX append
                fh.write(json.dumps(event) + "\n")
    return model


def clear_model_cache() -> None:
    """Forget cached models in this process (tests; freeing GPU memory in a notebook)."""
    _MODELS.clear()


def encoded_to_frame(enc: EncodedBatch, dim: int) -> pd.DataFrame:
    """An :class:`EncodedBatch` as the pandas frame of :data:`RESULT_TYPE`."""
    n = len(enc.status)
    positions, tokens, states = [None] * n, [None] * n, [None] * n
    for i, st in enumerate(enc.states):
        if st is not None:
            positions[i] = st.positions.astype(np.int32)
            tokens[i] = list(st.tokens)
            states[i] = list(np.asarray(st.vectors, dtype=np.float32))
    return pd.DataFrame(
        {
            "vector": [None if v is None else np.asarray(v, dtype=np.float32) for v in enc.vectors],
            "dim": [None if v is None else int(dim) for v in enc.vectors],
            "status": list(enc.status),
            "n_tokens": np.asarray(enc.n_tokens, dtype=np.int32),
            "positions": positions,
            "tokens": tokens,
            "states": states,
        }
    )


def make_embed_udf(spec: ModelSpec, load_log: Optional[str] = None):
    """A Pandas UDF ``(text, want_states: bool) -> struct`` (:data:`RESULT_TYPE`) for ``spec``.

    Each call of the returned column expression runs :meth:`EmbeddingModel.encode` on one Arrow batch; the model
    itself comes from :func:`get_model`, i.e. from this worker's cache after the first batch. Rows come back in
    input order (the model sorts by length internally and un-sorts).
    """

    @pandas_udf(RESULT_TYPE)
    def embed(batches: Iterator[Tuple[pd.Series, pd.Series]]) -> Iterator[pd.DataFrame]:
        model = None
        for text, want in batches:
            model = model or get_model(spec, load_log)  # lazily: an empty partition loads nothing
            enc = model.encode(text.tolist(), want.fillna(False).astype(bool).tolist())
            yield encoded_to_frame(enc, model.dim)

    return embed
