"""``exitrl demo``: the whole loop on 2 CPU cores. Build (or reuse) the tiny reasoning model,
evaluate it on held-out problems of the synthetic task (accuracy, thinking and total tokens by
difficulty), train it with S-GRPO (``configs/tiny_sgrpo.yaml``), evaluate again.

Writes ``summary.json`` (``baseline``, ``sgrpo``; with ``--compare`` also ``grpo``, ``ffs_group`` and
``ffs_group_zero`` on S-GRPO's rollout-token budget, and the exit oracle's ``oracle_think_tokens``)
and ``demo.png`` (with ``--compare`` also ``compare.png``) into ``--out``; ``DemoConfig`` holds the options.
``--seed K`` builds and trains from recipe seed K; ``--seeds 0,1,2`` runs each seed from scratch into
``--out/seed-K`` and writes ``seeds.json`` (per seed, and mean / min / max across seeds).

The claim the demo checks (``claim`` in the summary, per run): thinking at least 40 % shorter,
accuracy at most 1 point below the baseline, and no difficulty more than 3 points below its
baseline; accuracy differences are paired over the same held-out problems, with a bootstrap CI.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from rl.evaluation.heldout import evaluate_heldout
from rl.evaluation.race import underthinking_share
from rl.evaluation.scoring import paired_points
from rl.models.tiny_reasoner import TinyModelRecipe, build_tiny_model, deep_recipe
from rl.trainer.config import TrainConfig
from rl.trainer.config_loading import load_config
from rl.trainer.loop import train
from rollout.backends.base import RolloutBackend
from rollout.backends.factory import make_backend

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "tiny_sgrpo.yaml"
# the token level's recipe when both levels run on the 8-layer reasoner
DEEP_RECIPE = Path(__file__).resolve().parents[1] / "configs" / "tiny_deep_sgrpo.yaml"


FFS_GROUP = ["rollout.algorithm=ffs", "rollout.ffs.n=4", "rollout.ffs.finishers=2"]


GRPO = ["rollout.algorithm=grpo", "rollout.group_size=5"]


def demo_runs(compare: bool, task: str = "redundant") -> dict[str, list[str]]:
    """Run name -> overrides on top of the tiny S-GRPO recipe. On the recheck task the race adds GRPO
    with Kimi k1.5's length penalty (``loss.reward=kimi_length``) and keeps one FFS-group variant."""
    runs = {"sgrpo": []}
    if compare:
        runs["grpo"] = list(GRPO)
        runs["ffs_group"] = [*FFS_GROUP, "rollout.ffs.aborted=drop"]
        if task == "recheck":
            runs["grpo_length"] = [*GRPO, "loss.reward=kimi_length"]
        else:
            runs["ffs_group_zero"] = [*FFS_GROUP, "rollout.ffs.aborted=zero"]
    return runs


# runs that get S-GRPO's rollout-token budget (run.steps only caps them), evaluated more often
COMPUTE_MATCHED = ("grpo", "ffs_group", "ffs_group_zero", "grpo_length")
# the trained method the recheck race puts forward (its bar: ``rl.evaluation.race.race_figures``)
BEST = "sgrpo"


# the demo's claim: at least 40 % fewer thinking tokens, at most 1 point below overall, 3 per difficulty
CLAIM = {"min_think_cut": 0.40, "max_points_lost": 1.0, "max_points_lost_per_difficulty": 3.0}


def paired_change(baseline: dict, run: dict) -> dict:
    """Accuracy change (points) of ``run`` over ``baseline`` on the same problems, with a paired
    bootstrap CI (``paired_points``), overall and by difficulty."""
    a, b = baseline["item_accuracy"], run["item_accuracy"]
    overall = paired_points(a, b)  # raises unless both cover the same problems

    def on(ids: list[str]) -> dict:
        return paired_points({i: a[i] for i in ids}, {i: b[i] for i in ids})

    return {"overall": overall, "by_difficulty": {d: on(ds) for d, ds in baseline.get("difficulty_ids", {}).items()}}


def check_claim(baseline: dict, run: dict, change: dict) -> dict:
    """The demo's claim for one run against the baseline (``CLAIM``), each part and all of it."""
    cut = 1 - run["think_tokens"] / baseline["think_tokens"]
    worst = min((v["points"] for v in change["by_difficulty"].values()), default=0.0)
    parts = {
        "think_cut": round(cut, 4),
        "think_cut_ok": cut >= CLAIM["min_think_cut"],
        "accuracy_points": round(change["overall"]["points"], 2),
        "accuracy_ok": change["overall"]["points"] >= -CLAIM["max_points_lost"],
        "worst_difficulty_points": round(worst, 2),
        "difficulty_ok": worst >= -CLAIM["max_points_lost_per_difficulty"],
    }
    parts["holds"] = parts["think_cut_ok"] and parts["accuracy_ok"] and parts["difficulty_ok"]
    return parts


@dataclass
class DemoConfig:
    """What ``exitrl demo`` runs (``run_demo``; ``rl.demo_seeds.run_seeds`` runs it once per seed)."""

    out: str = field(metadata={"help": "output directory (summary.json, heldout_items.json, demo.png)"})
    n_eval: int = field(default=1000, metadata={"help": "held-out problems to evaluate"})
    seed: int = field(
        default=0, metadata={"help": "recipe seed: the tiny model's build (unless `recipe` is given) and the run's"}
    )
    recipe: TinyModelRecipe | None = field(
        default=None, metadata={"help": "the tiny model's build (default: TinyModelRecipe(seed=seed))"}
    )
    compare: bool = field(
        default=False,
        metadata={"help": "also GRPO and FFS groups on S-GRPO's rollout-token budget, and the exit oracle"},
    )
    steps: int | None = field(default=None, metadata={"help": "training steps (default: the recipe's)"})
    overrides: list[str] = field(
        default_factory=list, metadata={"help": "key=value overrides of configs/tiny_sgrpo.yaml, every run"}
    )
    routers: bool = field(
        default=True,
        metadata={
            "help": "both levels on the 8-layer tiny reasoner: S-GRPO on it, then routers on the S-GRPO policy "
            "(two-stage), then joint (off: the token level alone, on the 4-layer reasoner)"
        },
    )
    n_eval_routers: int = field(
        default=1000,
        metadata={
            "help": "held-out problems of the layer-level points (a 1-point claim needs 1000; n_eval when equal)"
        },
    )
    oracle: bool = field(
        default=False, metadata={"help": "the exit oracle's shortest correct thinking (implied by compare)"}
    )
    task: str = field(
        default="redundant",
        metadata={
            "help": "the synthetic task (rl.data.synthetic_task.TASKS): 'redundant' (every thought after the steps "
            "is redundant) or 'recheck' (a first pass the steps re-check; the layer stages sit it out)"
        },
    )
    joint: bool = field(
        default=True,
        metadata={"help": "after the routers (two-stage): joint training of policy and routers from there"},
    )
    joint_overrides: list[str] = field(
        default_factory=list, metadata={"help": "key=value overrides of the joint run (configs/tiny_joint.yaml)"}
    )
    routers_overrides: list[str] = field(
        default_factory=list,
        metadata={"help": "key=value overrides of the routers' recipe (configs/routers/tiny_deep.yaml)"},
    )


def run_demo(cfg: DemoConfig) -> dict:
    """Baseline -> S-GRPO (-> GRPO and FFS groups with ``compare``) -> evaluation (-> the layer stage
    with ``routers``, -> the joint stage with ``joint``). ``cfg.seed`` is the recipe seed: the tiny
    model's build (unless ``cfg.recipe`` is given) and the runs'."""
    from rl.data.synthetic_task import TASKS

    if cfg.task not in TASKS:
        raise ValueError(f"unknown task {cfg.task!r}; known: {sorted(TASKS)}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    build_tiny_model(token_model_recipe(cfg))  # the build first (cached; the 8-layer one grows the 4-layer's)
    t_built = time.time()
    backend, summary = _baseline(cfg)
    if cfg.compare or cfg.oracle:
        _oracle_stage(backend, cfg.n_eval, out, summary)
    _training_runs(cfg, out, summary)
    if cfg.task == "recheck" and cfg.compare:
        from rl.evaluation.race import plot_race, race_figures

        summary.update(race_figures(backend, summary, cfg.n_eval, BEST, first_pass=True))
        print(f"race ({BEST} put forward): {summary['race_claim']}")
        plot_race(summary, out / "race.png")
        print(f"the race on the baseline's front: {out / 'race.png'}")
    if both_levels(cfg):  # the layer level on the S-GRPO policy: routers (two-stage), static plan, joint
        from rl.joint_demo import layer_levels

        joint = cfg.joint_overrides if cfg.joint else None
        save = functools.partial(_write_summary, out, summary)
        layer_levels(out, summary, cfg.seed, cfg.n_eval_routers, cfg.routers_overrides, joint, save)
    summary["wall_s"] = round(time.time() - t0, 1)
    summary["wall_s_after_build"] = round(time.time() - t_built, 1)  # evaluations included
    _write_summary(out, summary)
    plot_runs(summary, out / "demo.png")
    print(f"summary: {out / 'summary.json'}  plot: {out / 'demo.png'}")
    if cfg.compare:
        print(compare_table(summary))
        plot_compute(summary, out / "compare.png")
        print(f"compute-matched comparison: {out / 'compare.png'}")
    return summary


def both_levels(cfg: DemoConfig) -> bool:
    """Whether the demo runs the layer level too (on the redundant task; the recheck task has no
    8-layer reasoner)."""
    return cfg.routers and cfg.task == "redundant"


def token_model_recipe(cfg: DemoConfig) -> TinyModelRecipe:
    """The one model the demo trains: the 8-layer reasoner when both levels run, else the 4-layer."""
    if cfg.recipe is not None:
        return cfg.recipe
    return deep_recipe(cfg.seed) if both_levels(cfg) else TinyModelRecipe(seed=cfg.seed, task=cfg.task)


def token_recipe(cfg: DemoConfig) -> Path:
    """The S-GRPO recipe of the demo's model (``token_model_recipe``)."""
    return DEEP_RECIPE if both_levels(cfg) else RECIPE


def _baseline(cfg: DemoConfig) -> tuple[RolloutBackend, dict]:
    """Build (or reuse) the tiny model and evaluate it: its backend and the summary's first entries."""
    model_dir = build_tiny_model(token_model_recipe(cfg))
    info = json.loads((model_dir / "build_info.json").read_text())
    print(f"tiny model: {model_dir} ({info['parameters'] / 1e6:.2f}M parameters, built in {info['build_seconds']} s)")
    backend = make_backend("hf", str(model_dir))
    baseline = evaluate_heldout(backend, cfg.n_eval)
    baseline["num_layers"] = backend.num_layers
    baseline["layers_executed_mean"] = float(backend.num_layers)  # unrouted: every layer, every token
    baseline["flops_ratio"] = 1.0
    print(format_table(baseline, "baseline"))
    baseline["underthinking_share"] = 0.0
    summary = {"seed": cfg.seed, "task": cfg.task, "model": str(model_dir), "model_info": info}
    return backend, {**summary, "baseline": baseline, "runs": {}}


def _oracle_stage(backend: RolloutBackend, n_eval: int, out: Path, summary: dict) -> None:
    summary["oracle"] = oracle_report(backend, n_eval)
    summary["oracle_think_tokens"] = summary["oracle"]["oracle_think_tokens"]
    print(
        f"exit oracle along the baseline's greedy chains: {summary['oracle_think_tokens']:.1f} thinking tokens "
        f"from where every later exit is right (the chains: {summary['oracle']['think_tokens']:.1f}; the earliest "
        f"correct exit, lucky guesses included: {summary['oracle']['first_correct_think_tokens']:.1f})"
    )
    _write_summary(out, summary)


def _training_runs(cfg: DemoConfig, out: Path, summary: dict) -> None:
    """Each of ``demo_runs``: trained from the baseline model, evaluated, added to the summary;
    the compute-matched runs get S-GRPO's rollout-token budget."""
    budget = None
    for name, extra in demo_runs(cfg.compare, cfg.task).items():
        ov = (
            [f"model.path={summary['model']}", f"run.out_dir={out / name}", f"run.seed={cfg.seed}"]
            + (["run.steps=" + str(cfg.steps)] if cfg.steps else [])
            + extra
            + list(cfg.overrides or [])
        )
        if name in COMPUTE_MATCHED and budget:
            cap = 20 * (cfg.steps or load_config(TrainConfig, token_recipe(cfg)).run.steps)
            ov += [f"run.rollout_token_budget={budget}", f"run.steps={cap}", "run.eval_every=4"]
        final = _trained_run(token_recipe(cfg), ov, extra, cfg.n_eval, summary)
        if name == "sgrpo":
            budget = final["rollout_tokens"]
        summary[name] = final
        summary["runs"][name] = str(out / name)
        _print_run(name, final)
        _write_summary(out, summary)


def _trained_run(recipe: Path, overrides: list[str], extra: list[str], n_eval: int, summary: dict) -> dict:
    """Train ``recipe`` with ``overrides`` (``extra``: the run's own, recorded), evaluate the
    result against the summary's baseline: the run's figures (``model``: its last checkpoint)."""
    baseline = summary["baseline"]
    cfg = load_config(TrainConfig, recipe, overrides)
    t_run = time.time()
    result = train(cfg)
    trained = make_backend("hf", str(Path(result["checkpoint"]) / "model"))
    final = evaluate_heldout(trained, n_eval)
    final["model"] = str(Path(result["checkpoint"]) / "model")
    final["train_wall_s"] = round(time.time() - t_run, 1)
    final["steps"] = result["steps"]
    final["eval_history"] = result["eval_history"]
    final["think_tokens_change"] = final["think_tokens"] / baseline["think_tokens"] - 1
    final["flops_ratio"] = final["flops_per_problem"] / baseline["flops_per_problem"]
    final["underthinking_share"] = underthinking_share(baseline["item_accuracy"], final["item_accuracy"])
    final["accuracy_change_points"] = 100 * (final["accuracy"] - baseline["accuracy"])
    final["paired_change"] = paired_change(baseline, final)
    final["claim"] = check_claim(baseline, final, final["paired_change"])
    final["overrides"] = extra
    final["rollout_tokens"] = result["rollout_tokens"]  # generated by the run's rollouts, all ranks
    final["wall_s"] = result["train_wall_s"]  # its training steps (held-out evaluations left out)
    if "oracle_think_tokens" in summary:
        final["oracle_ratio"] = final["think_tokens"] / summary["oracle_think_tokens"]
    return final


def _print_run(name: str, final: dict) -> None:
    print(format_table(final, name))
    ci = final["paired_change"]["overall"]["ci95_points"]
    print(
        f"{name}: thinking tokens {100 * final['think_tokens_change']:+.1f}% vs baseline, "
        f"accuracy {final['accuracy_change_points']:+.1f} points (paired 95% CI {ci[0]:+.1f} .. {ci[1]:+.1f}); "
        f"claim {'holds' if final['claim']['holds'] else 'FAILS'}: {final['claim']}"
    )


def oracle_report(backend, n_eval: int) -> dict:
    """``rl.evaluation.oracle.exit_oracle`` on the held-out problems the demo evaluates."""
    from rewards.batch import BatchVerifier, BatchVerifierConfig
    from rl.data.problems import DataConfig, load_problems
    from rl.evaluation.oracle import exit_oracle

    problems = load_problems(DataConfig(source="synthetic", split="test", limit=n_eval))
    with BatchVerifier(BatchVerifierConfig(workers=2)) as verifier:
        rep = exit_oracle(backend, problems, verifier.verify)
    rep.pop("items")
    return rep


def compare_table(summary: dict) -> str:
    """The compute-matched comparison as a markdown table (one row per method)."""
    base, oracle = summary["baseline"], summary.get("oracle_think_tokens")
    lines = [
        "| method | accuracy | paired points (95 % CI) | thinking | x oracle | underthinking | rollout tokens "
        "| train wall s |",
        "|---|---|---|---|---|---|---|---|",
        f"| baseline | {base['accuracy']:.3f} | | {base['think_tokens']:.1f} | "
        f"{base['think_tokens'] / oracle:.2f} | | | |"
        if oracle
        else f"| baseline | {base['accuracy']:.3f} | | {base['think_tokens']:.1f} | | | | |",
    ]
    for name in summary["runs"]:
        r = summary[name]
        pc = r["paired_change"]["overall"]
        lo, hi = pc["ci95_points"]
        ratio = f"{r['oracle_ratio']:.2f}" if "oracle_ratio" in r else ""
        lines.append(
            f"| {name} | {r['accuracy']:.3f} | {pc['points']:+.1f} ({lo:+.1f} .. {hi:+.1f}) | {r['think_tokens']:.1f} "
            f"({100 * r['think_tokens_change']:+.0f} %) | {ratio} | {r.get('underthinking_share', 0.0):.3f} "
            f"| {r['rollout_tokens']} | {r['wall_s']} |"
        )
    if oracle:
        lines.append(f"| exit oracle (baseline chains) | | | {oracle:.1f} | 1.00 | | | |")
    for p in summary.get("budget_front", []):
        tag = "none" if p["budget"] is None else p["budget"]
        lines.append(f"| baseline, think budget {tag} | {p['accuracy']:.3f} | | {p['think_tokens']:.1f} | | | | |")
    return "\n".join(lines)


def plot_compute(summary: dict, path: Path) -> None:
    """Held-out accuracy and thinking against cumulative rollout tokens and training wall time, a
    curve per method (the runs' periodic evaluations), with the baseline and the exit oracle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for name in summary["runs"]:
        hist = [h for h in summary[name]["eval_history"] if "rollout_tokens" in h]
        for col, x in enumerate(("rollout_tokens", "wall_s")):
            axes[0][col].plot([h[x] for h in hist], [h["accuracy"] for h in hist], marker="o", label=name)
            axes[1][col].plot([h[x] for h in hist], [h["think_tokens"] for h in hist], marker="o", label=name)
    for col, xlabel in enumerate(("cumulative rollout tokens", "training wall time, s")):
        axes[0][col].axhline(summary["baseline"]["accuracy"], color="gray", ls="--", label="baseline")
        axes[1][col].axhline(summary["baseline"]["think_tokens"], color="gray", ls="--", label="baseline")
        if "oracle_think_tokens" in summary:
            axes[1][col].axhline(summary["oracle_think_tokens"], color="black", ls=":", label="exit oracle")
        lowest = min([h["accuracy"] for n in summary["runs"] for h in summary[n]["eval_history"]], default=0.0)
        axes[0][col].set(xlabel=xlabel, ylabel="accuracy (held-out, greedy)", ylim=(max(0.0, lowest - 0.05), 1.01))
        axes[1][col].set(xlabel=xlabel, ylabel="mean thinking tokens (held-out, greedy)")
        if col == 0:  # token counts in thousands
            for row in (0, 1):
                axes[row][col].ticklabel_format(axis="x", style="sci", scilimits=(3, 3))
    axes[0][0].legend()
    axes[1][0].legend()
    fig.suptitle("same rollout-token budget: S-GRPO, GRPO, FFS groups")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _write_summary(out: Path, summary: dict) -> None:
    """summary.json without the per-item verdicts (those go to heldout_items.json, for paired checks)."""
    items = {}
    slim = {}
    for k, v in summary.items():
        if isinstance(v, dict) and "item_accuracy" in v:
            items[k] = {"item_accuracy": v["item_accuracy"], "difficulty_ids": v.get("difficulty_ids", {})}
            v = {kk: vv for kk, vv in v.items() if kk not in ("item_accuracy", "difficulty_ids")}
        slim[k] = v
    (out / "summary.json").write_text(json.dumps(slim, indent=2))
    (out / "heldout_items.json").write_text(json.dumps(items))


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
        f"total tokens {result['total_tokens']:.1f}, forward GFLOPs per problem "
        f"{(result.get('flops_per_problem') or 0) / 1e9:.3f} ({result.get('flops_ratio', 1.0):.3f} x baseline)",
        "  difficulty |    n | accuracy | think tok | total tok | stopped early | miscomputed",
    ]
    for k, r in result["by_difficulty"].items():
        lines.append(
            f"  {k:>10} | {r['n']:>4} | {r['accuracy']:>8.3f} | {r['think_tokens']:>9.1f} | {r['total_tokens']:>9.1f}"
            f" | {r['stopped_early_share']:>13.3f} | {r['miscomputed_share']:>11.3f}"
        )
    return "\n".join(lines)
