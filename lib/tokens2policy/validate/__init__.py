"""Validation study (issue 9): simulations with a known answer, run as Spark tasks (docs/validation.md)."""
from .designs import EntangledDesign, simulate
from .study import METHOD_NAMES, build_tasks, run_in_memory, run_task, selection_metrics, summarize_coverage, \
    summarize_selection, wilson_interval

__all__ = ["EntangledDesign", "METHOD_NAMES", "build_tasks", "run_in_memory", "run_task", "selection_metrics",
           "simulate", "summarize_coverage", "summarize_selection", "wilson_interval"]
