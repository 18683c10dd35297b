"""The score stage: the registered targeting policy applied to new units at scale (docs/score.md).

``tokens2policy.score.job.run(spark, cfg)`` scores ``score.input`` into the ``scores`` Delta table (columns in the table
registry, :mod:`tokens2policy.lakehouse.schemas`); :mod:`tokens2policy.score.models` picks the model version.
"""
