"""Reward functions, registered by name so a recipe can say ``reward: decaying``.

A reward takes one group (``RewardInput``: prompts, completions, golds, dataset rows and the
verifier's verdicts, for every member) and returns one float per member; the built-ins and plug-ins
named ``package.module:function`` in a recipe share that interface. A *serial group* (S-GRPO) is
ordered from the earliest exit to the full answer; a *parallel group* (GRPO) has no order.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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


def kimi_length_rewards(correct: Sequence[bool], lengths: Sequence[int]) -> list[float]:
    """GRPO's correctness reward plus Kimi k1.5's length reward (Kimi Team 2025, sec. 2.3.3) within a
    group of responses of ``lengths``:

        lambda_i = 0.5 - (len_i - min_len) / (max_len - min_len)      (0 when every length is equal)
        r_i      = 1 + lambda_i          if response i is correct
                   min(0, lambda_i)      otherwise

    so among correct answers the shortest gains 0.5 and the longest loses 0.5, and a wrong answer
    is never rewarded for being short."""
    lo, hi = min(lengths, default=0), max(lengths, default=0)
    out = []
    for ok, n in zip(correct, lengths):
        lam = 0.5 - (n - lo) / (hi - lo) if hi > lo else 0.0
        out.append(1.0 + lam if ok else min(0.0, lam))
    return out


def format_penalties(responses: Sequence[str], penalty: float = 0.5) -> list[float]:
    """-penalty for a response whose thinking never closed (``<think>`` without ``</think>``) or
    that commits to no answer; 0 otherwise. Added on top of a correctness reward."""
    out = []
    for r in responses:
        unclosed = THINK_OPEN in r and THINK_CLOSE not in r
        out.append(-penalty if unclosed or extract_answer(r) is None else 0.0)
    return out


@dataclass
class RewardInput:
    """One group's members in group order (serial groups: earliest exit -> full answer).

    ``completions`` are the texts the verifier read (``<think>`` prepended when the prompt opened
    the thinking); ``rows`` the dataset row of each member's problem (``id``, ``problem``,
    ``answer`` and the row's other scalar fields); ``correct`` the batch verifier's verdicts.
    """

    prompts: list[str]
    completions: list[str]
    golds: list[str]
    rows: list[dict]
    correct: list[bool]


RewardFn = Callable[[RewardInput], list[float]]


def decaying(group: RewardInput) -> list[float]:
    """S-GRPO's decaying reward on the group's verdicts (``decaying_rewards``)."""
    return decaying_rewards(group.correct)


def correctness(group: RewardInput) -> list[float]:
    """1 for a correct answer, 0 otherwise (``correctness_rewards``)."""
    return correctness_rewards(group.correct)


def kimi_length(group: RewardInput) -> list[float]:
    """GRPO with Kimi k1.5's length penalty (``kimi_length_rewards``), lengths in characters of the
    completion (thinking and answer)."""
    return kimi_length_rewards(group.correct, [len(c) for c in group.completions])


REWARDS: dict[str, RewardFn] = {
    "decaying": decaying,
    "correctness": correctness,
    "kimi_length": kimi_length,
}


def get_reward(name: str) -> RewardFn:
    """A registered reward, or a plug-in named ``package.module:function`` (imported; it takes a
    ``RewardInput`` and returns one float per member)."""
    if ":" in name:
        return load_reward_plugin(name)
    try:
        return REWARDS[name]
    except KeyError:
        raise KeyError(
            f"unknown reward {name!r}; registered: {sorted(REWARDS)} (or 'package.module:function')"
        ) from None


def load_reward_plugin(spec: str) -> RewardFn:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise KeyError(f"reward {spec!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise KeyError(f"reward {spec!r}: cannot import module {module_name!r} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise KeyError(f"reward {spec!r}: module {module_name!r} has no function {attr!r}")
    return fn


def register_reward(name: str, fn: RewardFn) -> RewardFn:
    if name in REWARDS or ":" in name:
        raise KeyError(f"reward {name!r} is already registered (or contains ':')")
    REWARDS[name] = fn
    return fn
