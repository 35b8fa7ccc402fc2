"""Rewards for GTPO (docs/algorithm.md §5.1) and answer grading shared with evaluation.

`Grader` grades (text, ground truth) pairs in time-limited worker processes;
`compute_rewards` turns rollouts (`RewardInput`) into the weighted scalar reward;
`register_reward` adds a custom reward by name.
"""

from gtpo_jax.rewards.answers import STATUSES, GradeResult, extract_boxed, grade_answer, has_boxed
from gtpo_jax.rewards.functions import (
    RewardFunction,
    RewardInput,
    compute_rewards,
    get_reward,
    register_reward,
    registered_rewards,
)
from gtpo_jax.rewards.grading import Grader, GraderConfig

__all__ = [
    "STATUSES", "GradeResult", "Grader", "GraderConfig", "RewardFunction", "RewardInput", "compute_rewards", "extract_boxed",
    "get_reward", "grade_answer", "has_boxed", "register_reward", "registered_rewards",
]
