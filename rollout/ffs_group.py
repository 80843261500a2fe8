"""FFS groups: First Finish Search as a training signal (``rollout.algorithm: ffs``).

    n samples of a prompt race, decoded together; the group closes once k of them have finished
    (emitted EOS); the others are aborted where they stand, so their compute stops.

    members, in finish order:  f_1 f_2 ... f_k  (shortest finisher first)  a_1 ... a_(n-k)  (aborted)
    reward:     S-GRPO's decaying reward over the finishers in that order (first correct 1, then 0.5, ...)
    aborted:    reward 0; ``aborted = "drop"`` leaves them out of the group (no advantage, no loss),
                ``"zero"`` keeps them in it (their advantage 0 - mean pushes down the unfinished thinking)

The estimator only sees the k shortest samples of the policy's length distribution and ranks them
by length: it is biased toward short completions (it is not the gradient of expected reward, which
would weigh every sample, long ones included). It still teaches shorter thinking because a short
correct finisher always outranks a longer correct one, while a short wrong one earns nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

from rollout.serial_group import full_sequence
from rollout.thinking import think_tag_ids, thinking_span
from rollout.types import Generation, RolloutBatch, SamplingConfig

ABORTED = ("drop", "zero")


@dataclass
class FFSGroupConfig:
    """How FFS groups are built."""

    n: int = field(default=8, metadata={"help": "samples raced per prompt"})
    finishers: int = field(default=4, metadata={"help": "k: the group closes once k samples have finished"})
    aborted: Literal["drop", "zero"] = field(
        default="drop",
        metadata={"help": "aborted samples: left out of the group's advantage and loss, or kept with reward 0"},
    )


def finish_order(gens: list[Generation]) -> list[int]:
    """Indices of one prompt's samples in finish order: samples that finished on their own (EOS),
    shortest first (they all started together, one token per step), then the unfinished ones."""
    done = sorted((i for i, g in enumerate(gens) if g.finish_reason == "stop"), key=lambda i: (gens[i].num_tokens, i))
    return done + [i for i, g in enumerate(gens) if g.finish_reason != "stop"]


def ffs_group_rollout(
    backend, prompt_ids: list[list[int]], sampling: SamplingConfig, cfg: FFSGroupConfig
) -> RolloutBatch:
    """One FFS group per prompt (group id = prompt index), members in finish order; every member is a
    full rollout (``is_full``), the unfinished ones with finish reason 'abort' (or 'length')."""
    if not 1 <= cfg.finishers <= cfg.n:
        raise ValueError(f"rollout.ffs.finishers={cfg.finishers} must be in 1..rollout.ffs.n={cfg.n}")
    open_id, close_id = think_tag_ids(backend.tokenizer)
    t0 = time.perf_counter()
    per_prompt = backend.generate_first_finish(
        prompt_ids, SamplingConfig(**{**vars(sampling), "n": cfg.n}), finishers=cfg.finishers
    )
    seqs = []
    for gid, gens in enumerate(per_prompt):
        for i in finish_order(gens):
            start, end, _closed = thinking_span(gens[i].completion_ids, open_id, close_id)
            seqs.append(full_sequence(gid, gens[i], start, end))
    stats = {
        "full_tokens": sum(g.num_tokens for gens in per_prompt for g in gens),  # aborted up to the abort
        "branch_tokens": 0,
        "full_wall_s": time.perf_counter() - t0,
        "branch_wall_s": 0.0,
        "finished": sum(g.finish_reason == "stop" for gens in per_prompt for g in gens),
        "aborted": sum(g.finish_reason != "stop" for gens in per_prompt for g in gens),
    }
    return RolloutBatch(seqs, len(prompt_ids), stats)


def ffs_members(batch: RolloutBatch, aborted: str) -> list[list[int]]:
    """Each group's member indices that enter rewards, advantages and the loss: all of them
    (``"zero"``), or only those that finished (``"drop"``)."""
    if aborted not in ABORTED:
        raise ValueError(f"unknown rollout.ffs.aborted {aborted!r}; known: {ABORTED}")
    groups = batch.group_indices()
    if aborted == "zero":
        return groups
    return [[i for i in idx if batch.sequences[i].finish_reason == "stop"] for idx in groups]
