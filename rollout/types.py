"""Typed batches that flow out of rollout: plain dataclasses of lists, testable stage by stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort"]


@dataclass
class Generation:
    """One sampled completion of one prompt."""

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]  # the sampler's log-prob of each completion token
    finish_reason: FinishReason
    prompt_index: int = 0  # which prompt of the request this answers

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
