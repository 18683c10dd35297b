"""Effects stage: GATEs per modifier, cross-fitted CATE learners (DR, R), calibration (BLP, GATES, RATE) — on the
units that did not select the modifiers (``tokens2policy.honesty``)."""
from .calibration import blp_test, calibration_table, gates_by_quantile, rate
from .gates import gate, gates_table, infer_split_kind, joint_interaction
from .learners import (
    DRLearner, NuisanceParams, RLearner, aipw_scores, cross_fit_nuisances, fit_fold_nuisances, fold_seed,
    nuisance_tasks,
)
from .ols import OLSResult, mean_with_se, ols

__all__ = [
    "DRLearner", "NuisanceParams", "OLSResult", "RLearner", "aipw_scores", "blp_test", "calibration_table",
    "cross_fit_nuisances", "fit_fold_nuisances", "fold_seed", "gate", "gates_by_quantile", "gates_table",
    "infer_split_kind", "joint_interaction", "mean_with_se", "nuisance_tasks", "ols", "rate",
]
