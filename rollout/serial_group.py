"""S-GRPO serial groups: one full rollout per prompt, then ``m`` early exits branched off its thinking.

    full  O0 = <think> t1 ... tn </think> answer0
    exit  Ci = <think> t1 ... t_Pi + EXIT_PROMPT + answer_i,   P1 < ... < Pm  (chosen by a strategy)

A group is ordered earliest exit -> full rollout, which is the order the decaying reward walks.
Branches share the prompt and thinking prefix; backends reuse that prefix (vLLM's prefix cache, HF's
single prefill) instead of recomputing it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from rollout.backends.base import RolloutBackend
from rollout.thinking import DEFAULT_EXIT_PROMPT, encode_in_context, think_tag_ids, thinking_span
from rollout.types import (
    ANSWER,
    EXIT_PROMPT,
    THINK,
    BranchRequest,
    Generation,
    RolloutBatch,
    RolloutSequence,
    SamplingConfig,
)


@dataclass
class SerialGroupConfig:
    """How serial groups are built."""

    num_exits: int = field(default=4, metadata={"help": "m: early exits per full rollout"})
    strategy: Literal["uniform", "window", "even"] = field(
        default="window",
        metadata={"help": "exit positions: uniform over thought tokens, uniform in a window, or evenly spaced"},
    )
    window: tuple[float, float] = field(default=(0.1, 0.9), metadata={"help": "fraction window for strategy 'window'"})
    exit_prompt: str = field(
        default=DEFAULT_EXIT_PROMPT, metadata={"help": "inserted at each exit; must close the thinking"}
    )
    answer_max_tokens: int = field(default=32, metadata={"help": "max tokens of an answer after an exit"})


# ---- exit position strategies: (thinking length n, m, rng, cfg) -> sorted distinct positions in [1, n]


def uniform_positions(n: int, m: int, rng: random.Random, cfg: SerialGroupConfig | None = None) -> list[int]:
    """m distinct positions drawn uniformly from the thought tokens 1..n (all of them when n <= m)."""
    return sorted(rng.sample(range(1, n + 1), min(m, n))) if n > 0 else []


def window_positions(n: int, m: int, rng: random.Random, cfg: SerialGroupConfig | None = None) -> list[int]:
    """m distinct positions drawn without replacement within [lo*n, hi*n] (at least 1, at most n)."""
    lo, hi = cfg.window if cfg else (0.1, 0.9)
    a, b = max(1, int(round(lo * n))), max(1, min(n, int(round(hi * n))))
    if n <= 0:
        return []
    pool = range(a, b + 1)
    return sorted(rng.sample(pool, min(m, len(pool))))


def even_positions(n: int, m: int, rng: random.Random | None = None, cfg: SerialGroupConfig | None = None) -> list[int]:
    """Evenly spaced: round(i * n / (m + 1)) for i = 1..m, deduplicated (fewer when n is short)."""
    return sorted({max(1, round(i * n / (m + 1))) for i in range(1, m + 1)}) if n > 0 else []


EXIT_STRATEGIES: dict[str, Callable[..., list[int]]] = {
    "uniform": uniform_positions,
    "window": window_positions,
    "even": even_positions,
}


def full_sequence(group_id: int, gen: Generation, start: int, end: int) -> RolloutSequence:
    regions = [THINK] * end + [ANSWER] * (len(gen.completion_ids) - end)
    return RolloutSequence(
        group_id,
        list(gen.prompt_ids),
        list(gen.completion_ids),
        regions,
        list(gen.logprobs),
        exit_position=end - start,
        is_full=True,
        finish_reason=gen.finish_reason,
    )


def _fulls_then_branches(backend: RolloutBackend, prompt_ids, full_sampling, answer_sampling, plan):
    """The full rollouts, each one's planned branch request and answers, and the seconds each phase
    took (a streaming backend overlaps them: all its time counts as the full phase)."""
    t0 = time.perf_counter()
    if backend.capabilities.streams_branches:
        # streaming backends start a group's branches the moment its full rollout finishes
        planned: dict[int, tuple[BranchRequest, tuple[int, int], list[int]]] = {}

        def request(i: int, g: Generation) -> BranchRequest:
            planned[i] = plan(i, g)
            return planned[i][0]

        fulls, branches = backend.generate_then_branch(prompt_ids, full_sampling, request, answer_sampling)
        plans = [planned[i] for i in range(len(fulls))]
        t_full, t_branch = time.perf_counter() - t0, 0.0
    else:
        fulls = backend.generate(prompt_ids, full_sampling)
        t_full = time.perf_counter() - t0
        plans = [plan(i, g) for i, g in enumerate(fulls)]
        t1 = time.perf_counter()
        requests = [r for r, _, _ in plans]
        branches = (
            backend.generate_branches(requests, answer_sampling)
            if any(r.cuts for r in requests)
            else [[] for _ in requests]
        )
        t_branch = time.perf_counter() - t1
    return fulls, plans, branches, t_full, t_branch


def serial_group_rollout(
    backend: RolloutBackend,
    prompt_ids: list[list[int]],
    sampling: SamplingConfig,
    cfg: SerialGroupConfig,
    seed: int = 0,
) -> RolloutBatch:
    """One serial group per prompt (group id = prompt index), ordered earliest exit -> full."""
    tok = backend.tokenizer
    open_id, close_id = think_tag_ids(tok)
    exit_ids = encode_in_context(tok, cfg.exit_prompt)
    if close_id not in exit_ids:
        raise ValueError(f"exit_prompt {cfg.exit_prompt!r} does not close the thinking with '</think>'")
    strategy = EXIT_STRATEGIES.get(cfg.strategy)
    if strategy is None:
        raise ValueError(f"unknown exit strategy {cfg.strategy!r}; known: {sorted(EXIT_STRATEGIES)}")

    def plan(i: int, g: Generation) -> tuple[BranchRequest, tuple[int, int], list[int]]:
        start, end, _closed = thinking_span(g.completion_ids, open_id, close_id)
        # one rng per group: positions do not depend on the order full rollouts finish in
        pos = strategy(end - start, cfg.num_exits, random.Random(seed * 1_000_003 + i), cfg)
        req = BranchRequest(
            list(g.prompt_ids) + list(g.completion_ids),
            [len(g.prompt_ids) + start + p for p in pos],
            exit_ids,
            route_len=len(g.prompt_ids),
        )
        return req, (start, end), pos

    full_sampling = SamplingConfig(**{**vars(sampling), "n": 1})
    answer_sampling = SamplingConfig(
        **{**vars(sampling), "n": 1, "max_tokens": cfg.answer_max_tokens, "seed": sampling.seed + 1}
    )
    fulls, plans, branches, t_full, t_branch = _fulls_then_branches(
        backend, prompt_ids, full_sampling, answer_sampling, plan
    )
    spans = [sp for _, sp, _ in plans]
    positions = [pos for _, _, pos in plans]

    seqs: list[RolloutSequence] = []
    for gid, (g, (start, end), pos, outs) in enumerate(zip(fulls, spans, positions, branches)):
        for p, a in zip(pos, outs):
            keep = start + p
            comp = list(g.completion_ids[:keep]) + exit_ids + list(a.completion_ids)
            regions = [THINK] * keep + [EXIT_PROMPT] * len(exit_ids) + [ANSWER] * len(a.completion_ids)
            lps = list(g.logprobs[:keep]) + [0.0] * len(exit_ids) + list(a.logprobs)
            seqs.append(
                RolloutSequence(
                    gid,
                    list(g.prompt_ids),
                    comp,
                    regions,
                    lps,
                    exit_position=p,
                    is_full=False,
                    finish_reason=a.finish_reason,
                )
            )
        seqs.append(full_sequence(gid, g, start, end))
    answers = [a for outs in branches for a in outs]
    stats = {
        "full_tokens": sum(len(g.completion_ids) for g in fulls),
        "branch_tokens": sum(len(a.completion_ids) for a in answers),
        "full_wall_s": t_full,
        "branch_wall_s": t_branch,
        **prefix_cache_stats(answers),
        "unclosed_thinking": sum(
            1 for g, (s, e) in zip(fulls, spans) if e == len(g.completion_ids) and close_id not in g.completion_ids
        ),
    }
    return RolloutBatch(seqs, len(prompt_ids), stats)


def prefix_cache_stats(gens: list[Generation]) -> dict:
    """Branch prompts' tokens and how many of them the backend's prefix cache served (backends that
    report it: vLLM's ``num_cached_tokens``); empty when none is reported."""
    seen = [g for g in gens if g.cached_tokens is not None]
    if not seen:
        return {}
    prompt = sum(len(g.prompt_ids) for g in seen)
    cached = sum(g.cached_tokens for g in seen)
    return {
        "branch_prompt_tokens": prompt,
        "branch_cached_tokens": cached,
        "branch_cache_hit_rate": round(cached / max(1, prompt), 4),
    }


def parallel_group_rollout(
    backend: RolloutBackend, prompt_ids: list[list[int]], sampling: SamplingConfig, group_size: int
) -> RolloutBatch:
    """GRPO's parallel groups: ``group_size`` independent full rollouts per prompt."""
    tok = backend.tokenizer
    open_id, close_id = think_tag_ids(tok)
    t0 = time.perf_counter()
    gens = backend.generate(prompt_ids, SamplingConfig(**{**vars(sampling), "n": group_size}))
    seqs = []
    for g in gens:
        start, end, _ = thinking_span(g.completion_ids, open_id, close_id)
        seqs.append(full_sequence(g.prompt_index, g, start, end))
    stats = {
        "full_tokens": sum(len(g.completion_ids) for g in gens),
        "branch_tokens": 0,
        "full_wall_s": time.perf_counter() - t0,
        "branch_wall_s": 0.0,
    }
    return RolloutBatch(seqs, len(prompt_ids), stats)
