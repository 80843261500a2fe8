"""The demo's two-level stage (``exitrl demo --joint``): on the 8-layer tiny reasoner, joint
training against the two-stage alternative, every model evaluated greedily on the same held-out
problems as the layer stage's unrouted baseline.

    joint      one run (``configs/tiny_joint.yaml``): S-GRPO serial groups + layer serial groups,
               routers warm-started from the layer stage's offline routers and trained with the policy
    two_stage  the same S-GRPO run without the layer level, then routers labelled and trained on the
               trained policy, frozen (``configs/routers/tiny_deep.yaml``)

Each point: ``accuracy``, ``think_tokens``, ``layers_executed_mean``, ``num_layers`` and
``compute`` = think tokens x executed layers / L, relative to the baseline's (all layers, its own
thinking); ``train_wall_s``. The claim (``JOINT_CLAIM``): joint compute at most 0.3 of the
baseline's, accuracy at most 1 point below it, and joint no worse than two-stage on compute at equal
or better accuracy. ``joint.png``: accuracy against compute for baseline, S-GRPO, routers-only,
two-stage and joint.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from rl.evaluation.heldout import evaluate_heldout
from rl.routing.pipeline import RoutersRecipe, load_model, run_label, run_train
from rl.trainer.checkpoint import latest_checkpoint
from rl.trainer.config import TrainConfig
from rl.trainer.config_loading import load_config
from rl.trainer.loop import train
from rollout.backends.factory import make_backend
from rollout.routing.routers import LayerRouters

ROOT = Path(__file__).resolve().parents[1]
JOINT_RECIPE = ROOT / "configs" / "tiny_joint.yaml"
ROUTERS_RECIPE = ROOT / "configs" / "routers" / "tiny_deep.yaml"
# joint: at most a quarter of the unrouted baseline's forward FLOPs, at most 1 point below its accuracy,
# and at or below two-stage's FLOPs at most 0.5 point below its accuracy
JOINT_CLAIM = {"max_flops_ratio": 0.25, "max_points_lost": 1.0, "max_points_below_two_stage": 0.5}


def compute_share(think_tokens: float, layers_executed: float, num_layers: int, baseline_think: float) -> float:
    """think tokens x executed layers / L, relative to the baseline's think tokens at all L layers."""
    return think_tokens * layers_executed / num_layers / baseline_think


def heldout_point(
    model_dir: str | Path,
    routers_dir: str | Path | None,
    n_eval: int,
    baseline_think: float,
    baseline_flops: float | None = None,
) -> dict:
    """Greedy held-out evaluation of a model (routed when ``routers_dir`` is given) as one point:
    its forward FLOPs per problem (``rollout.routing.compute.generation_flops``: prompt, thinking and
    answer at the layers each plan ran, routers included) and their ratio to ``baseline_flops``."""
    model, tok, _ = load_model(str(model_dir))
    routers = LayerRouters.load(routers_dir) if routers_dir is not None else None
    r = evaluate_heldout(make_backend("hf", "", model=model, tokenizer=tok, routers=routers), n_eval)
    L = model.config.num_hidden_layers
    layers = float(r["layers_executed_mean"] or L)
    return {
        "accuracy": r["accuracy"],
        "accuracy_ci95": r["accuracy_ci95"],
        "think_tokens": r["think_tokens"],
        "layers_executed_mean": layers,
        "num_layers": L,
        "compute": compute_share(r["think_tokens"], layers, L, baseline_think),
        "flops_per_problem": r["flops_per_problem"],
        "flops_ratio": r["flops_per_problem"] / baseline_flops if baseline_flops else 1.0,
        "item_accuracy": r["item_accuracy"],
    }


def training_seconds(run_dir: Path) -> float:
    """A run's training time: its steps' stage seconds (``time/*`` in ``metrics.jsonl``), so a
    resumed run counts every step once and model builds, evaluations and checkpoints not at all."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = {r["step"]: r for r in rows}  # a step logged again after a resume counts once
    return sum(v for r in last.values() for k, v in r.items() if k.startswith("time/"))


def _train(overrides: list[str]) -> tuple[Path, float]:
    cfg = load_config(TrainConfig, JOINT_RECIPE, overrides)
    train(cfg)  # resumes where an earlier, interrupted demo left the run
    ckpt = latest_checkpoint(cfg.run.out_dir)
    if ckpt is None:
        raise RuntimeError(f"{cfg.run.out_dir}: the run left no checkpoint")
    return ckpt / "model", training_seconds(Path(cfg.run.out_dir))


def joint_claim(joint: dict, two_stage: dict, base: dict) -> dict:
    """``JOINT_CLAIM`` for the joint point against the unrouted baseline and two-stage, each part and all."""
    points = 100 * (joint["accuracy"] - base["accuracy"])
    below_two_stage = 100 * (two_stage["accuracy"] - joint["accuracy"])
    claim = {
        "flops_ratio": round(joint["flops_ratio"], 4),
        "flops_ok": joint["flops_ratio"] <= JOINT_CLAIM["max_flops_ratio"],
        "compute": round(joint["compute"], 4),
        "accuracy_points": round(points, 2),
        "accuracy_ok": points >= -JOINT_CLAIM["max_points_lost"],
        "vs_two_stage_ok": joint["flops_ratio"] <= two_stage["flops_ratio"]
        and below_two_stage <= JOINT_CLAIM["max_points_below_two_stage"],
    }
    claim["holds"] = claim["flops_ok"] and claim["accuracy_ok"] and claim["vs_two_stage_ok"]
    return claim


def joint_stage(
    out: Path,
    model_dir: str,
    routers_dir: Path,
    layer_stage: dict,
    seed: int = 0,
    n_eval: int = 200,
    extra=(),
    routers_recipe: RoutersRecipe | None = None,
) -> dict:
    """``joint``, ``two_stage``, ``deep_sgrpo`` (the two-stage policy, unrouted) and ``joint_claim``,
    against the layer stage's baseline and routers-only results (``layer_stage``: the summary's
    ``routers`` object, evaluated on the same ``n_eval`` problems). ``extra``: overrides of both
    training runs; ``routers_recipe``: the two-stage routers' (default ``configs/routers/tiny_deep.yaml``)."""
    base = layer_stage["baseline"]
    base_think, base_flops = base["think_tokens"], base["flops_per_problem"]
    common = [f"model.path={model_dir}", f"run.seed={seed}", "run.eval_every=0", *extra]

    joint_dir, joint_wall = _train(
        [*common, f"run.out_dir={out / 'joint'}", f"layers.init_routers={routers_dir}", "layers.enabled=true"]
    )
    joint = heldout_point(joint_dir, joint_dir, n_eval, base_think, base_flops)
    joint["train_wall_s"] = round(joint_wall, 1)

    policy_dir, policy_wall = _train([*common, f"run.out_dir={out / 'two_stage' / 'sgrpo'}", "layers.enabled=false"])
    deep_sgrpo = heldout_point(policy_dir, None, n_eval, base_think, base_flops)
    deep_sgrpo["train_wall_s"] = round(policy_wall, 1)
    recipe = dataclasses.replace(routers_recipe or load_config(RoutersRecipe, ROUTERS_RECIPE), model=str(policy_dir))
    t0 = time.time()
    model_tok = load_model(str(policy_dir))
    run_label(recipe, out / "two_stage" / "routers", model_tok=model_tok)
    run_train(recipe, out / "two_stage" / "routers", model_tok=model_tok)
    routers_wall = time.time() - t0
    two_stage = {
        **heldout_point(policy_dir, out / "two_stage" / "routers" / "routers", n_eval, base_think, base_flops),
        "train_wall_s": round(policy_wall + routers_wall, 1),
    }

    claim = joint_claim(joint, two_stage, base)
    routers_only = {
        "accuracy": layer_stage["accuracy"],
        "think_tokens": layer_stage["think_tokens"],
        "layers_executed_mean": layer_stage["layers_executed_mean"],
        "num_layers": layer_stage["num_layers"],
        "compute": compute_share(
            layer_stage["think_tokens"], layer_stage["layers_executed_mean"], layer_stage["num_layers"], base_think
        ),
        "flops_per_problem": layer_stage["flops_per_problem"],
        "flops_ratio": layer_stage["flops_ratio"],
    }
    result = {
        "joint": joint,
        "two_stage": two_stage,
        "deep_sgrpo": deep_sgrpo,
        "routers_only": routers_only,
        "deep_baseline": {
            "accuracy": base["accuracy"],
            "think_tokens": base_think,
            "layers_executed_mean": float(base["num_layers"]),
            "num_layers": base["num_layers"],
            "compute": 1.0,
            "flops_per_problem": base_flops,
            "flops_ratio": 1.0,
        },
        "joint_claim": claim,
    }
    plot_accuracy_vs_compute(result, out / "joint.png")
    slim = {
        k: ({kk: vv for kk, vv in v.items() if kk != "item_accuracy"} if k != "joint_claim" else v)
        for k, v in result.items()
    }
    (out / "joint_summary.json").write_text(json.dumps(slim, indent=2))
    return slim


def plot_accuracy_vs_compute(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [("deep_baseline", "baseline"), ("deep_sgrpo", "S-GRPO"), ("routers_only", "routers only")]
    names += [("two_stage", "two-stage"), ("joint", "joint")]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in names:
        p = result[key]
        x = p["flops_ratio"]
        ax.scatter([x], [p["accuracy"]], label=f"{label} ({x:.2f}, {p['accuracy']:.3f})")
    ax.axvline(JOINT_CLAIM["max_flops_ratio"], color="grey", linestyle=":", linewidth=1)
    ax.set(
        xlabel="forward FLOPs per problem / the unrouted baseline's",
        ylabel="held-out accuracy",
        title="8-layer tiny reasoner: tokens and layers",
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
