"""Typed batches that flow out of rollout: plain dataclasses of lists, testable stage by stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort"]

# What each completion token of a rollout sequence is (``RolloutSequence.regions``).
THINK = 0  # thinking sampled by the policy (for an exit branch: the kept prefix)
EXIT_PROMPT = 1  # inserted by the rollout, never sampled ("Time is limited ... </think>\n\n")
ANSWER = 2  # sampled after the thinking closed (or after the exit prompt)


@dataclass
class Generation:
    """One sampled completion of one prompt."""

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]  # the sampler's log-prob of each completion token
    finish_reason: FinishReason
    prompt_index: int = 0  # which prompt of the request this answers
    plan: list[int] | None = None  # routed models: the layer plan it was generated under
    cached_tokens: int | None = None  # prompt tokens served by the prefix cache (None: not reported)

    @property
    def num_tokens(self) -> int:
        return len(self.completion_ids)


@dataclass
class SamplingConfig:
    """Sampling settings shared by every backend."""

    max_tokens: int = field(default=400, metadata={"help": "max new tokens per completion"})
    temperature: float = field(default=1.0, metadata={"help": "0 = greedy"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    n: int = field(default=1, metadata={"help": "completions per prompt"})
    seed: int = field(default=0, metadata={"help": "seed (engine-level on vLLM CPU)"})


@dataclass
class BranchRequest:
    """Continuations of one shared sequence: for each cut ``c``, ``base_ids[:c] + suffix_ids``
    is a prompt to complete. Backends reuse the shared prefix (vLLM prefix cache, HF one prefill)."""

    base_ids: list[int]
    cuts: list[int]
    suffix_ids: list[int]
    route_len: int | None = None  # routed models: the routers read base_ids[:route_len] (the prompt)


@dataclass
class RolloutSequence:
    """One member of a group, ready for rewards and the learner.

    ``completion_ids`` is everything after the prompt; ``regions[t]`` says what token ``t`` is
    (THINK / EXIT_PROMPT / ANSWER); ``logprobs[t]`` is the sampler's log-prob (0.0 for inserted
    exit-prompt tokens, which the policy never sampled).
    """

    group_id: int
    prompt_ids: list[int]
    completion_ids: list[int]
    regions: list[int]
    logprobs: list[float]
    exit_position: int  # thinking tokens kept before answering (the full rollout: all of them)
    is_full: bool  # the group's full rollout (last in a serial group)
    finish_reason: FinishReason

    @property
    def sampled_mask(self) -> list[int]:
        """1 where the policy sampled the token, 0 for inserted exit-prompt tokens."""
        return [int(r != EXIT_PROMPT) for r in self.regions]

    @property
    def think_tokens(self) -> int:
        return sum(1 for r in self.regions if r == THINK)


@dataclass
class RolloutBatch:
    """Groups of sequences; a serial group is ordered earliest exit -> full rollout."""

    sequences: list[RolloutSequence]
    num_groups: int
    stats: dict = field(default_factory=dict)  # tokens generated, wall time per phase, ...

    def group_indices(self) -> list[list[int]]:
        """Per group, the indices of its members in ``sequences`` (in order)."""
        out: list[list[int]] = [[] for _ in range(self.num_groups)]
        for i, s in enumerate(self.sequences):
            out[s.group_id].append(i)
        return out

    def groups(self) -> list[list[RolloutSequence]]:
        return [[self.sequences[i] for i in idx] for idx in self.group_indices()]
