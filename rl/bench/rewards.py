"""``exitrl bench rewards``: verified items per second over mixed responses, and the worst-case
latency of one item, through the isolated batch verifier."""

from __future__ import annotations

import random
import time

from rewards.batch import BatchVerifier, BatchVerifierConfig

# (response template, gold) pairs spanning the answer kinds the verifier handles.
_MIXED = [
    ("<think>\n1: 3+5=8\n</think>\n\nThe answer is \\boxed{{{a}}}.", "{a}"),
    (
        "Let me compute. So the total is $\\frac{{{a}}}{{4}}$. Final answer: \\boxed{{\\frac{{{a}}}{{4}}}}",
        "\\frac{{{a}}}{{4}}",
    ),
    ("The answer is \\boxed{{{a}\\%}}", "{a}\\%"),
    ("Thus $x = {a}$, so \\boxed{{x={a}}}", "{a}"),
    ("\\boxed{{({a}, {a}+1]}}", "({a},{a}+1]"),
    (
        "\\boxed{{\\begin{{pmatrix}} {a} & 0 \\\\ 0 & 1 \\end{{pmatrix}}}}",
        "\\begin{{pmatrix}}{a}&0\\\\0&1\\end{{pmatrix}}",
    ),
    ("so it is {a},000 dollars. \\boxed{{{a},000}}", "{a}000"),
    ("\\boxed{{{a}\\sqrt{{2}}}}", "{a}\\sqrt2"),
    ("<think>never closed \\boxed{{{a}}}", "{a}"),
]
# hostile items: each must come back within the verifier's time bound
_ADVERSARIAL = [
    "The answer is \\boxed{9^{9^{9^{9^{9}}}}}",
    "\\boxed{1000000000!}",
    "\\boxed{" * 4000,
    "x" * 200_000,
    "\\boxed{__import__('os').system('true')}",
]


def mixed_responses(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    resp, gold = [], []
    for _ in range(n):
        tpl, g = rng.choice(_MIXED)
        a = rng.randint(1, 999)
        resp.append(tpl.format(a=a))
        gold.append(g.format(a=a if rng.random() < 0.8 else a + 1))
    return resp, gold


def main(n: int = 10000, workers: int = 2) -> dict:
    responses, golds = mixed_responses(n)
    with BatchVerifier(BatchVerifierConfig(workers=workers)) as bv:
        bv.verify(responses[:workers], golds[:workers])  # start workers outside the timing
        t0 = time.perf_counter()
        verdicts = bv.verify(responses, golds)
        wall = time.perf_counter() - t0
        # worst case of one item: each kind alone, and each hostile item alone, through the pool
        worst, worst_kind = 0.0, None
        probes = [(tpl.format(a=7), g.format(a=7)) for tpl, g in _MIXED] + [(r, "42") for r in _ADVERSARIAL]
        for resp, gold in probes:
            t = time.perf_counter()
            bv.verify([resp], [gold])
            dt = time.perf_counter() - t
            if dt > worst:
                worst, worst_kind = dt, resp[:40]
        stats = dict(bv.stats)
    return {
        "items": n,
        "workers": workers,
        "items_per_s": n / wall,
        "wall_s": wall,
        "accepted_share": sum(verdicts) / n,
        "timeouts": stats["timeouts"],
        "crashes": stats["crashes"],
        "timeout_s": bv.config.timeout_s,
        "worst_item_latency_s": worst,
        "worst_item_kind": worst_kind,
    }
