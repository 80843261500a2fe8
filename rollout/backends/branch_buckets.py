"""Which serial-group branches decode together on a padded (HF) batch.

A batch of branches is left-padded to its longest cut ``P``: every row attends over, and its cache
holds, ``P + S + T`` columns (``S`` exit-prompt tokens, ``T`` answer tokens) however short its own
cut. Cuts spread over the thinking (S-GRPO's window is 10-90 % of it): the 512 branches of
``exitrl bench rollout --backend hf`` have cuts of 72 to 318 tokens, mean 125, and one batch pads
them all to 318. Decoding branches sorted by cut in a few buckets pays each bucket's own decode
steps instead:

    cost(buckets) = sum_b  rows_b * (P_b + extra)  +  bucket_cost * len(buckets)

``extra`` = ``S + T / 2`` (the columns the suffix and the answer add, on average) and
``bucket_cost`` are in padded row-columns. ``min_cost_buckets`` minimises it over contiguous runs
of the sorted cuts whose boundaries lie on a grid of quantiles (an exact dynamic programme over
``grid + 1`` points).
"""

from __future__ import annotations

# one more bucket's own decode steps (the model's fixed cost per step) in padded row-columns: a
# fit of the branch phase's time over 1-8 equal-count buckets of the bench's 512 branches (tiny
# model, 2 CPU cores): 0.06 s per bucket against 4.5 us per row-column. `exitrl bench rollout
# --backend hf --profile` times the split it gives against one padded batch.
DEFAULT_BUCKET_COST = 13_000


def min_cost_buckets(
    cuts: list[int], extra: float, bucket_cost: float = DEFAULT_BUCKET_COST, grid: int = 32
) -> list[list[int]]:
    """Indices into ``cuts``, grouped into buckets of ascending cuts (each bucket's indices in
    ascending cut order; the buckets together hold every index once), minimising
    ``sum rows_b * (max cut_b + extra) + bucket_cost * buckets``."""
    if bucket_cost < 0:
        raise ValueError(f"bucket_cost must be >= 0, got {bucket_cost}")
    order = sorted(range(len(cuts)), key=lambda i: cuts[i])
    n = len(order)
    if n == 0:
        return []
    # candidate boundaries: quantile positions, moved to the end of their run of equal cuts
    points = sorted({min(n, max(1, round(q * n / grid))) for q in range(1, grid + 1)})
    points = sorted({_run_end(cuts, order, p) for p in points})
    bounds = [0, *points]  # bucket = order[bounds[i]:bounds[j]]
    best = [0.0] + [float("inf")] * (len(bounds) - 1)
    prev = [0] * len(bounds)
    for j in range(1, len(bounds)):
        top = cuts[order[bounds[j] - 1]]  # the bucket's longest cut
        for i in range(j):
            cost = best[i] + (bounds[j] - bounds[i]) * (top + extra) + bucket_cost
            if cost < best[j]:
                best[j], prev[j] = cost, i
    buckets, j = [], len(bounds) - 1
    while j > 0:
        buckets.append(order[bounds[prev[j]] : bounds[j]])
        j = prev[j]
    return buckets[::-1]


def _run_end(cuts: list[int], order: list[int], p: int) -> int:
    """``p`` moved past every following index with the same cut (equal cuts share a bucket)."""
    while p < len(order) and cuts[order[p]] == cuts[order[p - 1]]:
        p += 1
    return p
