"""Policy stage: threshold and budget rules, exact depth-≤3 policy trees on DR scores, AIPW policy value."""
from .rules import budget_policy, threshold_policy
from .tree import PolicyTree, candidate_thresholds
from .value import compare_policies, policy_value, value_summands

__all__ = ["PolicyTree", "budget_policy", "candidate_thresholds", "compare_policies", "policy_value",
           "threshold_policy", "value_summands"]
