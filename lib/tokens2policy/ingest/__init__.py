"""The ingest stage: experiment logs → validated, fold-sharded ``units`` and a ``quarantine`` (docs/ingest.md).

``tokens2policy.ingest.job.run(spark, cfg)`` is the stage; :mod:`~tokens2policy.ingest.demo` is the bundled
semi-synthetic experiment on the BBC News corpus; :mod:`~tokens2policy.ingest.validate` holds the reject reasons.
"""
from tokens2policy.ingest.validate import REASONS

__all__ = ["REASONS"]
