"""Held-out evaluation on the embedded synthetic task, in the names the demo summary and the
trainer's ``eval/*`` metrics use (``accuracy``, ``think_tokens``, ``total_tokens``, by difficulty).

The synthetic task knows each problem's steps, so a wrong answer is also classified: the thinking
stopped before writing the last step (``stopped_early``: over-shortening), wrote every step but
computed one wrong (``miscomputed``), or computed every step right and then answered something
else (``overthought``: on this task, a re-check that miscomputes and the answer taken from it).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from rl.data.synthetic_task import heldout_problems
from rl.evaluation.run import SYNTHETIC, EvalSettings, evaluate

FAILURES = ("stopped_early", "miscomputed", "overthought")


def evaluate_heldout(
    backend, n_problems: int = 200, max_tokens: int = 400, verify_many=None, progress: bool = True
) -> dict:
    """Greedy accuracy and token use on held-out synthetic problems, overall and by difficulty,
    through the same path as ``exitrl eval --benchmarks synthetic`` (``rl.evaluation.run.evaluate``)."""
    settings = EvalSettings(strategy="greedy", max_tokens=max_tokens, progress=progress)
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "records.jsonl"
        report = evaluate(backend, [SYNTHETIC], settings, limit=n_problems, verify_many=verify_many, store=store)
        records = [json.loads(line) for line in store.read_text().splitlines()]
    report = report["benchmarks"][SYNTHETIC]
    kinds = failure_kinds(records, report["item_accuracy"])
    by_difficulty = {}
    for k, v in report["by_difficulty"].items():
        ids = report["difficulty_ids"][k]
        by_difficulty[k] = {**_view(v), **_failure_shares([kinds[i] for i in ids if i in kinds], len(ids))}
    return {
        **_view(report),
        **_failure_shares(list(kinds.values()), len(report["item_accuracy"])),
        "accuracy_ci95": report["accuracy_ci95"],
        "layers_executed_mean": report.get("layers_executed_mean"),
        "flops_per_problem": report.get("flops_per_problem"),
        **({"layers": report["layers"]} if report.get("layers") else {}),
        "item_accuracy": report["item_accuracy"],
        "difficulty_ids": report["difficulty_ids"],
        "by_difficulty": by_difficulty,
    }


def classify_failure(problem, response: str) -> str:
    """Why a wrong answer to a synthetic problem is wrong (see the module docstring)."""
    think = response.split("</think>")[0]
    lines = problem.step_lines()
    last_label = f"\n{problem.difficulty}: "
    if last_label not in think and not think.startswith(last_label[1:]):
        return "stopped_early"
    if not all(line in think for line in lines):
        return "miscomputed"
    return "overthought"


def failure_kinds(records: list[dict], item_accuracy: dict[str, float]) -> dict[str, str]:
    """Item id -> failure kind, for the wrong items (greedy: one record per item)."""
    wrong = {i for i, a in item_accuracy.items() if a < 1}
    if not wrong:
        return {}
    problems = {p.id: p for p in heldout_problems(max(int(i.rsplit("-", 1)[1]) for i in item_accuracy) + 1)}
    return {r["id"]: classify_failure(problems[r["id"]], r["response"]) for r in records if r["id"] in wrong}


def _failure_shares(kinds: list[str], n: int) -> dict:
    return {f"{k}_share": sum(1 for x in kinds if x == k) / max(1, n) for k in FAILURES}


def _view(m: dict) -> dict:
    """The demo summary's names for an evaluation report's metrics."""
    return {
        "n": m["n_items"],
        "accuracy": m["accuracy"],
        "think_tokens": m["think_tokens_mean"],
        "total_tokens": m["completion_tokens_mean"],
    }
