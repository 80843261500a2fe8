"""Answer extraction and verification for math, format checks, and S-GRPO's decaying rewards."""

from rewards.batch import BatchVerifier, BatchVerifierConfig, verify_batch
from rewards.reward_functions import (
    REWARDS,
    RewardInput,
    correctness_rewards,
    decaying_rewards,
    format_penalties,
    get_reward,
    register_reward,
)
from rewards.verify import VerifyConfig, extract_answer, verify_answer

__all__ = [
    "BatchVerifier",
    "BatchVerifierConfig",
    "REWARDS",
    "RewardInput",
    "VerifyConfig",
    "correctness_rewards",
    "decaying_rewards",
    "extract_answer",
    "format_penalties",
    "get_reward",
    "register_reward",
    "verify_answer",
    "verify_batch",
]
