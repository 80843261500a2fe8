"""``exitrl demo``: build (or reuse) the tiny reasoning model and report its baseline on held-out
problems of the synthetic task, by difficulty: accuracy, mean thinking tokens, mean total tokens.

Writes ``summary.json`` into ``--out``.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

from rewards.verify import verify_answer
from rl.problems import build_prompt
from rl.tiny_model import TinyModelRecipe, build_tiny_model, heldout_problems
from rollout.hf_backend import HFBackend
from rollout.types import SamplingConfig


def thinking_tokens(completion_ids: list[int], think_close_id: int) -> int:
    """Tokens before ``</think>`` (all of them when thinking never closed)."""
    try:
        return completion_ids.index(think_close_id)
    except ValueError:
        return len(completion_ids)


def evaluate_synthetic(backend: HFBackend, n_problems: int = 200, max_tokens: int = 400) -> dict:
    """Greedy accuracy and token use on held-out synthetic problems, overall and by difficulty."""
    tok = backend.tokenizer
    problems = heldout_problems(n_problems)
    prompts = [tok(build_prompt(tok, p.problem), add_special_tokens=False)["input_ids"] for p in problems]
    gens = backend.generate(prompts, SamplingConfig(max_tokens=max_tokens, temperature=0.0))
    close_id = tok.convert_tokens_to_ids("</think>")
    rows = defaultdict(list)
    for p, g in zip(problems, gens):
        text = tok.decode(g.completion_ids, skip_special_tokens=False)
        rows[p.difficulty].append(
            (verify_answer(text, p.answer), thinking_tokens(g.completion_ids, close_id), len(g.completion_ids))
        )

    def summarise(items):
        return {
            "n": len(items),
            "accuracy": sum(c for c, _, _ in items) / len(items),
            "think_tokens": statistics.mean(t for _, t, _ in items),
            "total_tokens": statistics.mean(n for _, _, n in items),
        }

    everything = [r for items in rows.values() for r in items]
    return {**summarise(everything), "by_difficulty": {str(k): summarise(v) for k, v in sorted(rows.items())}}


def run_demo(out_dir: str, n_eval: int = 200, recipe: TinyModelRecipe | None = None) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model_dir = build_tiny_model(recipe)
    info = json.loads((model_dir / "build_info.json").read_text())
    print(f"tiny model: {model_dir} ({info['parameters'] / 1e6:.2f}M parameters, built in {info['build_seconds']} s)")
    backend = HFBackend.from_pretrained(str(model_dir))
    baseline = evaluate_synthetic(backend, n_eval)
    summary = {"model": str(model_dir), "model_info": info, "baseline": baseline, "wall_s": round(time.time() - t0, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(format_table(baseline, "baseline"))
    print(f"summary: {out / 'summary.json'}")
    return summary


def format_table(result: dict, name: str) -> str:
    lines = [f"{name}: accuracy {result['accuracy']:.3f}, thinking tokens {result['think_tokens']:.1f}, total tokens {result['total_tokens']:.1f}",
             "  difficulty |   n | accuracy | think tok | total tok"]
    for k, r in result["by_difficulty"].items():
        lines.append(f"  {k:>10} | {r['n']:>3} | {r['accuracy']:>8.3f} | {r['think_tokens']:>9.1f} | {r['total_tokens']:>9.1f}")
    return "\n".join(lines)
