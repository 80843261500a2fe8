"""``exitrl demo``: the whole loop on 2 CPU cores. Build (or reuse) the tiny reasoning model,
evaluate it on held-out problems of the synthetic task (accuracy, thinking and total tokens by
difficulty), train it with S-GRPO (``configs/tiny_sgrpo.yaml``), evaluate again.

Writes ``summary.json`` (``baseline``, ``sgrpo``; with ``--compare`` also ``grpo`` on the same
budget and the loss-mask ablation) and ``demo.png`` into ``--out``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rl.evaluation.heldout import evaluate_heldout
from rl.models.tiny_reasoner import TinyModelRecipe, build_tiny_model
from rl.trainer.config import TrainConfig
from rl.trainer.config_loading import load_config
from rl.trainer.loop import train
from rollout.backends.hf import HFBackend

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "tiny_sgrpo.yaml"


def demo_runs(compare: bool) -> dict[str, list[str]]:
    """Run name -> overrides on top of the tiny S-GRPO recipe."""
    runs = {"sgrpo": []}
    if compare:
        runs["grpo"] = ["rollout.algorithm=grpo", "rollout.group_size=5"]
        runs["sgrpo_mask_prefix_exit_answer"] = ["loss.loss_mask=prefix_exit_answer"]
    return runs


def run_demo(
    out_dir: str,
    n_eval: int = 200,
    recipe: TinyModelRecipe | None = None,
    compare: bool = False,
    steps: int | None = None,
    overrides: list[str] | None = None,
) -> dict:
    """Baseline -> S-GRPO (-> GRPO and the loss-mask ablation with ``compare``) -> evaluation."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model_dir = build_tiny_model(recipe)
    info = json.loads((model_dir / "build_info.json").read_text())
    print(f"tiny model: {model_dir} ({info['parameters'] / 1e6:.2f}M parameters, built in {info['build_seconds']} s)")
    backend = HFBackend.from_pretrained(str(model_dir))
    baseline = evaluate_heldout(backend, n_eval)
    print(format_table(baseline, "baseline"))
    summary = {"model": str(model_dir), "model_info": info, "baseline": baseline, "runs": {}}
    for name, extra in demo_runs(compare).items():
        ov = (
            [f"model.path={model_dir}", f"run.out_dir={out / name}"]
            + (["run.steps=" + str(steps)] if steps else [])
            + extra
            + list(overrides or [])
        )
        cfg = load_config(TrainConfig, RECIPE, ov)
        t_run = time.time()
        result = train(cfg)
        trained = HFBackend.from_pretrained(str(Path(result["checkpoint"]) / "model"))
        final = evaluate_heldout(trained, n_eval)
        final["train_wall_s"] = round(time.time() - t_run, 1)
        final["steps"] = result["steps"]
        final["eval_history"] = result["eval_history"]
        final["think_tokens_change"] = final["think_tokens"] / baseline["think_tokens"] - 1
        final["accuracy_change_points"] = 100 * (final["accuracy"] - baseline["accuracy"])
        final["overrides"] = extra
        summary[name] = final
        summary["runs"][name] = str(out / name)
        print(format_table(final, name))
        print(
            f"{name}: thinking tokens {100 * final['think_tokens_change']:+.1f}% vs baseline, "
            f"accuracy {final['accuracy_change_points']:+.1f} points"
        )
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    summary["wall_s"] = round(time.time() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_runs(summary, out / "demo.png")
    print(f"summary: {out / 'summary.json'}  plot: {out / 'demo.png'}")
    return summary


def plot_runs(summary: dict, path: Path) -> None:
    """Held-out thinking tokens and accuracy against training step, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for name in summary["runs"]:
        hist = summary[name]["eval_history"]
        if not hist:
            continue
        a1.plot([h["step"] for h in hist], [h["think_tokens"] for h in hist], marker="o", label=name)
        a2.plot([h["step"] for h in hist], [h["accuracy"] for h in hist], marker="o", label=name)
    a1.axhline(summary["baseline"]["think_tokens"], color="gray", ls="--", label="baseline")
    a2.axhline(summary["baseline"]["accuracy"], color="gray", ls="--", label="baseline")
    a1.set(xlabel="step", ylabel="mean thinking tokens (held-out, greedy)", title="thinking")
    a2.set(xlabel="step", ylabel="accuracy (held-out, greedy)", title="accuracy", ylim=(0, 1.02))
    a1.legend()
    a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_table(result: dict, name: str) -> str:
    lines = [
        f"{name}: accuracy {result['accuracy']:.3f}, thinking tokens {result['think_tokens']:.1f}, "
        f"total tokens {result['total_tokens']:.1f}",
        "  difficulty |   n | accuracy | think tok | total tok",
    ]
    for k, r in result["by_difficulty"].items():
        lines.append(
            f"  {k:>10} | {r['n']:>3} | {r['accuracy']:>8.3f} | {r['think_tokens']:>9.1f} | {r['total_tokens']:>9.1f}"
        )
    return "\n".join(lines)
