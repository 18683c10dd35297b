"""In memory or on Spark: the execution choice of the stages that have both cores.

The identify stage (the in-memory NEXIS engine on one :class:`~tokens2policy.identify.stats.Block`, or the
``mapInPandas`` reductions of :class:`~tokens2policy.identify.job.SparkSource`) and the effects stage's nuisance
cross-fit (``cross_fit_local``, or one Spark task per nuisance fit) compute the same numbers either way; on data
that fits the driver the in-memory core avoids Spark's fixed cost per job (tens to hundreds of jobs per stage).

:func:`choose` picks by size from the ``execution`` config section (:class:`tokens2policy.config.ExecutionConfig`):
``auto`` runs in memory while the inputs' entries (rows x dense columns + stored non-zeros) and the estimated bytes
of the driver frame stay within ``max_entries`` / ``max_bytes``; ``memory`` / ``spark`` (globally or per stage)
force a path. :meth:`ExecutionChoice.record` logs the choice and its reason in one line, as the MLflow params
``execution.<scope>`` / ``execution.<scope>.reason`` and the tag ``t2p.execution.<scope>``; the stage summary carries
:meth:`ExecutionChoice.as_dict`.

The choice is not part of a stage's config hash (``Stage.runtime`` in :mod:`tokens2policy.stages`): both paths
write the same tables, so changing only the execution mode does not make a stage stale.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

MODES = ("auto", "memory", "spark")
ARRAY_OVERHEAD = 112  # bytes of one small numpy array object (a row's indices / values in the driver frame)


def frame_bytes(n_rows: int, n_columns: int, nnz: int) -> int:
    """Estimated driver bytes of a collected frame: ``n_columns`` 8-byte columns, two array cells per row
    (indices int32, values up to float64) holding ``nnz`` entries in all."""
    return int(n_rows) * (8 * int(n_columns) + 2 * ARRAY_OVERHEAD) + 12 * int(nnz)


@dataclass(frozen=True)
class ExecutionChoice:
    scope: str        # the stage (or a part of it: "represent.labels")
    mode: str         # "memory" or "spark"
    reason: str
    entries: int      # rows x dense columns + stored non-zeros
    bytes: int        # estimated driver frame bytes

    def as_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        return f"[{self.scope}] execution: {self.mode} ({self.reason})"

    def record(self, ctx) -> None:
        """One log line, the MLflow params and tag of the choice (ctx: a StageContext)."""
        ctx.echo(self.line())
        ctx.log_params({f"execution.{self.scope}": self.mode, f"execution.{self.scope}.reason": self.reason[:500]})
        ctx.set_tag(f"t2p.execution.{self.scope}", self.mode)


def choose(execution, scope: str, n_rows: int, n_columns: int, nnz: int) -> ExecutionChoice:
    """The execution of ``scope`` for inputs of ``n_rows`` rows, ``n_columns`` dense columns and ``nnz`` stored
    non-zeros, under the ``execution`` config section (an ExecutionConfig or a view of it)."""
    stages = getattr(execution, "stages", {}) or {}
    mode = stages.get(scope, execution.mode)
    entries = int(n_rows) * int(n_columns) + int(nnz)
    size = frame_bytes(n_rows, n_columns, nnz)
    what = f"{int(n_rows):,} rows, {entries:,} entries, ~{size / 2 ** 20:.1f} MiB"
    if mode not in MODES:
        raise ValueError(f"execution mode {mode!r}: choose one of {', '.join(MODES)}")
    if mode != "auto":
        src = f"execution.stages.{scope}" if scope in stages else "execution.mode"
        return ExecutionChoice(scope, mode, f"{src}={mode}; {what}", entries, size)
    over = []
    if entries > execution.max_entries:
        over.append(f"entries > execution.max_entries={execution.max_entries:,}")
    if size > execution.max_bytes:
        over.append(f"bytes > execution.max_bytes={execution.max_bytes:,}")
    if over:
        return ExecutionChoice(scope, "spark", f"auto: {what}; {' and '.join(over)}", entries, size)
    return ExecutionChoice(scope, "memory", f"auto: {what} within execution.max_entries={execution.max_entries:,} "
                                            f"and max_bytes={execution.max_bytes:,}", entries, size)


def in_memory_only(scope: str, n_rows: int, n_columns: int, nnz: int, why: str) -> ExecutionChoice:
    """The record of a stage (part) that has one core, on the driver (the policy stage: exact trees on the
    collected estimation units): nothing to choose, but the log line, MLflow param and summary say so and how
    big the collected frame was (``why``: what it collects)."""
    entries = int(n_rows) * int(n_columns) + int(nnz)
    size = frame_bytes(n_rows, n_columns, nnz)
    return ExecutionChoice(scope, "memory", f"one core, on the driver ({why}): {int(n_rows):,} rows, "
                                            f"~{size / 2 ** 20:.1f} MiB", entries, size)

