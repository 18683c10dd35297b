"""NEXIS identification of direct effect modifiers (issue 6): exact, sparse, additive statistics."""
from .engine import MarginalResult, NexisResult, bh_adjust, bh_reject, make_folds, marginal, nexis

__all__ = ["nexis", "marginal", "NexisResult", "MarginalResult", "make_folds", "bh_adjust", "bh_reject"]
