"""Scoring saved generations: accuracy with a bootstrap interval, token efficiency, AES.

One record per generated sample: ``{"id", "sample", "response", "completion_tokens",
"think_tokens", "closed", "total_tokens", "sequential_tokens"}`` (thinking counted by
``rollout.thinking.thinking_tokens``).
"""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

from rl.data.problems import Problem


class EvalError(ValueError):
    """Bad evaluation input; the message names the file, line or option."""


def load_report(path: Path) -> dict:
    """A saved ``report.json`` of ``exitrl eval``; anything else is an ``EvalError`` naming the file."""
    try:
        report = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        report = None
    if not isinstance(report, dict) or not isinstance(report.get("benchmarks"), dict):
        raise EvalError(f"{path}: not a report of exitrl eval (no 'benchmarks' object)")
    return report


def bootstrap_ci(values: list[float], n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over items."""
    if not values:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    k = len(values)
    means = sorted(sum(values[rng.randrange(k)] for _ in range(k)) / k for _ in range(n_boot))
    return means[int(alpha / 2 * n_boot)], means[min(n_boot - 1, int((1 - alpha / 2) * n_boot))]


def paired_bootstrap_ci(
    before: list[float], after: list[float], n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(after_i - before_i) over items resampled in pairs
    (both runs scored on the same items, so per-item luck cancels)."""
    if len(before) != len(after):
        raise ValueError(f"paired samples differ in length: {len(before)} vs {len(after)}")
    return bootstrap_ci([b - a for a, b in zip(before, after)], n_boot=n_boot, alpha=alpha, seed=seed)


def paired_points(first: dict[str, float], second: dict[str, float]) -> dict:
    """``second`` minus ``first`` (per-problem verdicts keyed by problem id, e.g. routers minus the
    static plan), in accuracy points, with a paired bootstrap CI over the same problems."""
    ids = sorted(first)
    if sorted(second) != ids:
        raise ValueError("a paired comparison needs both verdicts on the same problems")
    a, b = [first[i] for i in ids], [second[i] for i in ids]
    lo, hi = paired_bootstrap_ci(a, b)
    return {"points": 100 * (sum(b) - sum(a)) / len(ids), "ci95_points": [100 * lo, 100 * hi], "n": len(ids)}


def accuracy_efficiency_score(
    acc: float,
    tokens: float,
    base_acc: float,
    base_tokens: float,
    alpha: float = 1.0,
    beta: float = 3.0,
    gamma: float = 5.0,
) -> float:
    """AES (Luo et al., O1-Pruner): rewards length saved, penalises accuracy lost more than it
    rewards accuracy gained.

        dL = (L_base - L) / L_base,  dA = (A - A_base) / A_base
        AES = alpha dL + beta |dA|   if dA >= 0,   alpha dL - gamma |dA|   otherwise
    """
    dl = (base_tokens - tokens) / base_tokens if base_tokens else 0.0
    da = (acc - base_acc) / base_acc if base_acc else 0.0
    return alpha * dl + (beta * abs(da) if da >= 0 else -gamma * abs(da))


def score_records(records: list[dict], problems: list[Problem], strategy: str, n: int, verify_many) -> dict:
    """Metrics of one benchmark from its saved records
    (``verify_many(responses, golds) -> list[bool]``, e.g. the isolated batch verifier).

    Problems that carry a ``difficulty`` (the synthetic task) also get the same metrics by
    difficulty under ``by_difficulty``.
    """
    from rewards.verify import extract_answer
    from rollout.ffs import majority_vote

    gold = {p.id: p.answer for p in problems}
    by_item: dict[str, list[dict]] = {}
    for r in records:
        if r["id"] not in gold:
            raise EvalError(f"saved response for id {r['id']!r} is not in the benchmark ({len(gold)} items)")
        by_item.setdefault(r["id"], []).append(r)
    missing = [pid for pid in gold if pid not in by_item]
    if missing:
        raise EvalError(
            f"{len(missing)} benchmark items have no saved response (first: {missing[0]!r}); rerun to resume generation"
        )
    verdicts = verify_many([r["response"] for r in records], [gold[r["id"]] for r in records])
    verdict = dict(zip((id(r) for r in records), verdicts))
    items = {}
    for pid, recs in by_item.items():
        recs = sorted(recs, key=lambda r: r["sample"])
        ok = [verdict[id(r)] for r in recs]
        if strategy == "majority":
            answers = [extract_answer(r["response"]) for r in recs]
            winner = majority_vote(answers)
            pick = next((o for a, o in zip(answers, ok) if a == winner), False) if winner is not None else False
            acc = float(pick)
        else:
            acc = sum(ok) / len(ok)  # pass@1 averaged over samples (ffs: the winner)
        items[pid] = {
            "accuracy": acc,
            "think": [r["think_tokens"] for r in recs if r.get("think_tokens") is not None],
            "completion": [r["completion_tokens"] for r in recs if r.get("completion_tokens") is not None],
            "closed": [
                bool(r.get("closed", "</think>" in r["response"] or "<think>" not in r["response"])) for r in recs
            ],
            "total": recs[0].get("total_tokens") or sum(r.get("completion_tokens") or 0 for r in recs),
            "sequential": recs[0].get("sequential_tokens") or max((r.get("completion_tokens") or 0) for r in recs),
            "plans": [r["plan"] for r in recs if r.get("plan") is not None],
        }
    key = {"majority": f"maj@{n}", "ffs": f"ffs@{n}"}.get(strategy, "pass@1")
    out = {"n_items": len(items), "samples_per_item": n, "metric": key, **_summarise(list(items.values()))}
    out["item_accuracy"] = {pid: it["accuracy"] for pid, it in items.items()}  # for paired comparisons
    difficulty = {p.id: p.meta.get("difficulty") for p in problems}
    if all(d is not None for d in difficulty.values()):
        groups: dict[str, list[str]] = {}
        for pid in items:
            groups.setdefault(str(difficulty[pid]), []).append(pid)
        order = sorted(groups, key=int)
        out["by_difficulty"] = {
            k: {"n_items": len(groups[k]), **_summarise([items[i] for i in groups[k]])} for k in order
        }
        out["difficulty_ids"] = {k: sorted(groups[k]) for k in order}
    return out


def _summarise(items: list[dict]) -> dict:
    def mean(xs):
        return statistics.mean(xs) if xs else None

    think = [t for it in items for t in it["think"]]
    closed = [c for it in items for c in it["closed"]]
    item_acc = [it["accuracy"] for it in items]
    lo, hi = bootstrap_ci(item_acc)
    return {
        "accuracy": sum(item_acc) / len(item_acc),
        "accuracy_ci95": [lo, hi],
        "think_tokens_mean": mean(think),
        "think_tokens_median": statistics.median(think) if think else None,
        "completion_tokens_mean": mean([c for it in items for c in it["completion"]]),
        "total_tokens_mean": mean([it["total"] for it in items]),
        "sequential_tokens_mean": mean([it["sequential"] for it in items]),
        "unclosed_thinking_share": 1 - sum(closed) / len(closed) if closed else None,
        "layers_executed_mean": layers_executed_mean([p for it in items for p in it["plans"]]),
    }


def layers_executed_mean(plans: list[list[int]]) -> float | None:
    """Mean executed layer passes per sequence (a repeat counts twice); None without routed plans."""
    return statistics.mean(sum(p) for p in plans) if plans else None


def layer_usage(plans: list[list[int]]) -> dict:
    """Per-layer skip and repeat rates of routed plans."""
    L = len(plans[0])
    executed = layers_executed_mean(plans)
    return {
        "num_layers": L,
        "layers_executed_mean": executed,
        "layer_fraction": executed / L,
        "skip_rate_per_layer": [round(sum(p[i] == 0 for p in plans) / len(plans), 4) for i in range(L)],
        "repeat_rate_per_layer": [round(sum(p[i] == 2 for p in plans) / len(plans), 4) for i in range(L)],
        "distinct_plans": len({tuple(p) for p in plans}),
    }
