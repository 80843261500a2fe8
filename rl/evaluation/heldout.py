"""Held-out evaluation on the embedded synthetic task, in the names the demo summary and the
trainer's ``eval/*`` metrics use (``accuracy``, ``think_tokens``, ``total_tokens``, by difficulty)."""

from __future__ import annotations

from rl.evaluation.run import SYNTHETIC, EvalSettings, evaluate


def evaluate_heldout(
    backend, n_problems: int = 200, max_tokens: int = 400, verify_many=None, progress: bool = True
) -> dict:
    """Greedy accuracy and token use on held-out synthetic problems, overall and by difficulty,
    through the same path as ``exitrl eval --benchmarks synthetic`` (``rl.evaluation.run.evaluate``)."""
    settings = EvalSettings(strategy="greedy", max_tokens=max_tokens, progress=progress)
    report = evaluate(backend, [SYNTHETIC], settings, limit=n_problems, verify_many=verify_many)["benchmarks"][
        SYNTHETIC
    ]
    return {
        **_view(report),
        "accuracy_ci95": report["accuracy_ci95"],
        "by_difficulty": {k: _view(v) for k, v in report["by_difficulty"].items()},
    }


def _view(m: dict) -> dict:
    """The demo summary's names for an evaluation report's metrics."""
    return {
        "n": m["n_items"],
        "accuracy": m["accuracy"],
        "think_tokens": m["think_tokens_mean"],
        "total_tokens": m["completion_tokens_mean"],
    }
