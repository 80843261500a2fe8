"""The race's figures beyond accuracy and length (``exitrl demo --task recheck --compare``).

``underthinking_share``: the share of all held-out problems a method gets wrong while the baseline's
full chain gets them right (thinking cut where it was needed). ``front_budgets`` and ``front_at``:
the baseline's forced-budget front (``rl.evaluation.budget_front``) and its accuracy at a given mean
thinking, by linear interpolation between its points: a trained method earns its keep when it is
above the front at its own thinking (a fixed budget with no training would otherwise do as well).
"""

from __future__ import annotations


def underthinking_share(baseline_items: dict[str, float], run_items: dict[str, float]) -> float:
    """Share of all problems (``item_accuracy`` maps, the same ids) right for the baseline, wrong for the run."""
    if set(baseline_items) != set(run_items):
        raise ValueError("underthinking_share needs both evaluated on the same problems")
    lost = sum(1 for i, a in baseline_items.items() if a >= 1 and run_items[i] < 1)
    return lost / max(1, len(baseline_items))


def front_budgets(mean_think: float, points: int = 7) -> list[int]:
    """``points`` budgets from 0 to the baseline's mean thinking, evenly spaced (distinct, ascending)."""
    return sorted({round(mean_think * k / (points - 1)) for k in range(points)})


def front_at(front: list[dict], think_tokens: float) -> float:
    """The front's accuracy at ``think_tokens`` of mean thinking (linear between its points; flat
    beyond its ends). ``front``: points with ``think_tokens`` and ``accuracy``."""
    pts = sorted((p["think_tokens"], p["accuracy"]) for p in front)
    if think_tokens <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if think_tokens <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (think_tokens - x0) / (x1 - x0)
    return pts[-1][1]


def hardest(by_difficulty: dict) -> str:
    return max(by_difficulty, key=int)


def race_figures(backend, summary: dict, n_eval: int, best: str, first_pass: bool) -> dict:
    """The summary's additions for the race: ``budget_front`` (the baseline's, at ``front_budgets``
    of its mean thinking, on the held-out problems), ``first_pass_accuracy`` per difficulty in the
    baseline (the exit oracle's first-line accuracy, when ``first_pass``: the thinking opens with
    one), ``best`` and ``race_claim`` (the bar of ``best``; see the README)."""
    from rewards.batch import BatchVerifier, BatchVerifierConfig
    from rl.data.problems import DataConfig, load_problems
    from rl.evaluation.budget_front import budget_front

    base = summary["baseline"]
    problems = load_problems(DataConfig(source="synthetic", split="test", limit=n_eval))
    with BatchVerifier(BatchVerifierConfig(workers=2)) as verifier:
        front = budget_front(backend, problems, front_budgets(base["think_tokens"]), verifier.verify, max_tokens=400)
    front = [{k: p[k] for k in ("budget", "accuracy", "think_tokens", "forced_share")} for p in front]
    oracle = summary.get("oracle", {}).get("by_difficulty", {})
    if first_pass:
        for d, v in base["by_difficulty"].items():
            v["first_pass_accuracy"] = oracle.get(d, {}).get("first_line_accuracy")
    run = summary[best]
    d = hardest(base["by_difficulty"])
    full, first = base["by_difficulty"][d]["accuracy"], base["by_difficulty"][d].get("first_pass_accuracy")
    at_front = front_at([p for p in front if p["budget"] is not None], run["think_tokens"])
    claim = {
        "hardest_difficulty": d,
        "hardest_full_minus_first_pass_points": round(100 * (full - first), 2) if first is not None else None,
        "hardest_recheck_share": oracle.get(d, {}).get("recheck_share"),
        "best_think_cut": round(-run["think_tokens_change"], 4),
        "best_accuracy_points": round(run["accuracy_change_points"], 2),
        "best_underthinking_share": round(run["underthinking_share"], 4),
        "front_accuracy_at_best_thinking": round(at_front, 4),
    }
    claim["holds"] = bool(
        claim["hardest_full_minus_first_pass_points"] is not None
        and claim["hardest_full_minus_first_pass_points"] >= 5
        and (claim["hardest_recheck_share"] or 0) >= 0.2
        and claim["best_think_cut"] >= 0.4
        and claim["best_accuracy_points"] >= -1
        and claim["best_underthinking_share"] <= 0.02
        and run["accuracy"] > at_front
    )
    return {"budget_front": front, "best": best, "race_claim": claim}


def plot_race(summary: dict, path) -> None:
    """The race on the baseline's forced-budget front: the front as a line (budgets annotated), each
    method of ``summary["runs"]`` and the unbudgeted baseline as a point (mean thinking, accuracy),
    the exit oracle's mean thinking as a vertical line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    front = sorted((p for p in summary["budget_front"] if p["budget"] is not None), key=lambda p: p["think_tokens"])
    ax.plot(
        [p["think_tokens"] for p in front],
        [p["accuracy"] for p in front],
        color="gray",
        marker=".",
        label="baseline, forced budget",
    )
    for p in front:
        ax.annotate(str(p["budget"]), (p["think_tokens"], p["accuracy"]), fontsize=6, color="gray")
    base = summary["baseline"]
    ax.scatter([base["think_tokens"]], [base["accuracy"]], color="black", marker="s", label="baseline")
    for name in summary["runs"]:
        r = summary[name]
        star = "*" if name == summary.get("best") else "o"
        ax.scatter([r["think_tokens"]], [r["accuracy"]], marker=star, s=80 if star == "*" else 30, label=name)
    if "oracle_think_tokens" in summary:
        ax.axvline(summary["oracle_think_tokens"], color="black", ls=":", lw=1, label="exit oracle")
    ax.set(
        xlabel="mean thinking tokens (held-out, greedy)",
        ylabel="accuracy",
        title="the race on the baseline's accuracy-length front",
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
