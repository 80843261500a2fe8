"""Robust router labels: per-problem search labels consolidated onto a vocabulary of plans that hold
on most problems.

The search (``label_search``) finds, per problem, *a* shortest correct plan; many are equally short
and the one kept depends on the search path. Routers decide each layer on its own from the prompt,
so inconsistent labels teach them to mix skips from different plans, and a plan that holds on only
some problems (on the 8-layer reasoner the most common search label reproduces the full model on
0.78 of the problems) fails wherever the routers misjudge the problem. Consolidation fixes both:

1. vocabulary: the ``vocab_size`` configurations the search found correct most often (over every
   searched problem, not only the labels), plus all-execute;
2. every vocabulary plan is scored on every problem (one batched teacher-forced forward each):
   ``passes [N, V]``, and each plan's pass rate over the problems;
3. label = the shortest vocabulary plan that passes on this problem *and* on at least
   ``min_pass_rate`` of all problems (ties: the higher pass rate); all-execute when none does.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch


@dataclass
class VocabularyConfig:
    """How search labels become robust labels."""

    search_problems: int = field(
        default=200, metadata={"help": "problems searched (the first ones); the vocabulary comes from their search"}
    )
    vocab_size: int = field(default=24, metadata={"help": "plans in the vocabulary (the most often found correct)"})
    min_pass_rate: float = field(
        default=0.95, metadata={"help": "a label plan must pass on at least this share of all labelled problems"}
    )


def plan_vocabulary(search_rows: list[dict], num_layers: int, vocab_size: int) -> list[tuple[int, ...]]:
    """The ``vocab_size`` plans found correct on the most searched problems (ties: fewer executed
    passes, then first seen), then all-execute. Only plans with fewer passes than all-execute compete:
    a label is the shortest plan that passes, so one with ``num_layers`` passes or more (a repeat, or
    a skip paid back by a repeat) could only ever stand in for all-execute and would take a slot."""
    counts: Counter[tuple[int, ...]] = Counter()
    for r in search_rows:
        for p in r.get("passing") or [r["plan"]] * bool(r.get("full_correct")):
            if sum(p) < num_layers:
                counts[tuple(p)] += 1
    ranked = sorted(counts, key=lambda p: (-counts[p], sum(p)))
    return ranked[:vocab_size] + [(1,) * num_layers]


def robust_labels(
    vocab: list[tuple[int, ...]], passes: torch.Tensor, min_pass_rate: float
) -> tuple[list[int], list[float]]:
    """passes [N, V] bool (plan v reproduces problem n; rows of problems the full model gets wrong are
    all False) -> the label index per problem and each plan's pass rate over the problems that pass
    with all-execute. The label: the shortest plan passing on its problem with pass rate >=
    ``min_pass_rate`` (ties: higher rate); all-execute (the last plan) when none does."""
    full = len(vocab) - 1
    solved = passes[:, full]  # [N]
    rates = (passes[solved].float().mean(0) if bool(solved.any()) else torch.zeros(len(vocab))).tolist()
    robust = [v for v in range(len(vocab)) if rates[v] >= min_pass_rate or v == full]
    order = sorted(robust, key=lambda v: (sum(vocab[v]), -rates[v]))
    labels = []
    for row in passes.tolist():
        labels.append(next((v for v in order if row[v]), full))
    return labels, rates
