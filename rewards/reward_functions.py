"""Reward functions, registered by name so a recipe can say ``reward: decaying``.

Every reward maps a group's correctness verdicts (and, for format, the responses) to one float per
member. A *serial group* (S-GRPO) is ordered from the earliest exit to the full answer; a
*parallel group* (GRPO) has no order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rewards.verify import THINK_CLOSE, THINK_OPEN, extract_answer


def decaying_rewards(correct: Sequence[bool]) -> list[float]:
    """S-GRPO decaying reward over a serial group ordered earliest exit -> full answer.

    r_i = 1 / 2^(n_right(i) - 1) if member i is correct, else 0,
    where n_right(i) counts the correct members among 0..i (i included).
    So the earliest correct exit gets 1, the next correct one 0.5, then 0.25, ...
    """
    out, n_right = [], 0
    for ok in correct:
        if ok:
            n_right += 1
            out.append(1.0 / 2 ** (n_right - 1))
        else:
            out.append(0.0)
    return out


def correctness_rewards(correct: Sequence[bool]) -> list[float]:
    """Plain GRPO reward: 1 for a correct answer, 0 otherwise."""
    return [1.0 if ok else 0.0 for ok in correct]


def format_penalties(responses: Sequence[str], penalty: float = 0.5) -> list[float]:
    """-penalty for a response whose thinking never closed (``<think>`` without ``</think>``) or
    that commits to no answer; 0 otherwise. Added on top of a correctness reward."""
    out = []
    for r in responses:
        unclosed = THINK_OPEN in r and THINK_CLOSE not in r
        out.append(-penalty if unclosed or extract_answer(r) is None else 0.0)
    return out


RewardFn = Callable[[Sequence[bool]], list[float]]
REWARDS: dict[str, RewardFn] = {
    "decaying": decaying_rewards,
    "correctness": correctness_rewards,
}


def get_reward(name: str) -> RewardFn:
    try:
        return REWARDS[name]
    except KeyError:
        raise KeyError(f"unknown reward {name!r}; registered: {sorted(REWARDS)}") from None


def register_reward(name: str, fn: RewardFn) -> RewardFn:
    if name in REWARDS:
        raise KeyError(f"reward {name!r} is already registered")
    REWARDS[name] = fn
    return fn
