"""The demo's two-level stage: on the model the token level trained (the 8-layer tiny reasoner),
two-stage against joint, every model evaluated greedily on the same held-out problems as the
unrouted baseline.

    two_stage  the S-GRPO policy, then routers labelled and trained offline on it, frozen
               (``configs/routers/tiny_deep.yaml``; the demo's ``routers`` object)
    joint      from there, one run (``configs/tiny_joint.yaml``) of S-GRPO serial groups and layer
               variants together: the policy learns under the plans the routers sample and the routers
               under the accuracy constraint; its training time counts the S-GRPO run and the
               routers it starts from

Each point: ``accuracy`` (with its CI and the paired change against the baseline),
``think_tokens``, ``layers_executed_mean``, ``num_layers``, ``flops_per_problem`` and
``flops_ratio`` (``rollout.routing.compute.generation_flops``: prompt, thinking and answer at the
layers each plan ran, routers included, over the unrouted baseline's), ``compute`` = think tokens x
executed layers / L relative to the baseline's (thinking only: a second column), ``train_wall_s``.
The claim (``JOINT_CLAIM``): joint at most 0.25 of the baseline's FLOPs, at most 1 point below its
accuracy, and at or below two-stage's FLOPs at most 0.5 point below its accuracy. ``joint.png``:
accuracy against FLOPs for every method.
"""

from __future__ import annotations

import json
from pathlib import Path

from rl.evaluation.heldout import evaluate_heldout
from rl.evaluation.scoring import paired_points
from rl.routing.pipeline import load_model
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


def heldout_point(model_dir: str | Path, routers_dir: str | Path | None, n_eval: int, base: dict | None) -> dict:
    """Greedy held-out evaluation of a model (routed when ``routers_dir`` is given) as one method
    point (``method_point``) against ``base`` (``None``: the model is its own baseline)."""
    model, tok, _ = load_model(str(model_dir))
    routers = LayerRouters.load(routers_dir) if routers_dir is not None else None
    r = evaluate_heldout(make_backend("hf", "", model=model, tokenizer=tok, routers=routers), n_eval)
    r["num_layers"] = model.config.num_hidden_layers
    return method_point(r, base or {**r, "layers_executed_mean": float(r["num_layers"])})


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


def method_point(r: dict, base: dict) -> dict:
    """A held-out evaluation (``evaluate_heldout``, or a routers stage's routed result) as one method
    point against the unrouted ``base``: FLOPs ratio, thinking x layers, paired accuracy change."""
    L = int(r.get("num_layers") or base["num_layers"])
    layers = float(r.get("layers_executed_mean") or L)
    return {
        "accuracy": r["accuracy"],
        "accuracy_ci95": r["accuracy_ci95"],
        "think_tokens": r["think_tokens"],
        "layers_executed_mean": layers,
        "num_layers": L,
        "compute": compute_share(r["think_tokens"], layers, L, base["think_tokens"]),
        "flops_per_problem": r["flops_per_problem"],
        "flops_ratio": r["flops_per_problem"] / base["flops_per_problem"],
        "paired_vs_baseline": paired_points(base["item_accuracy"], r["item_accuracy"]),
        "item_accuracy": r["item_accuracy"],
    }


def joint_stage(
    out: Path,
    policy: dict,
    routers: dict,
    routers_dir: Path,
    base: dict,
    seed: int = 0,
    extra=(),
    static_plan: dict | None = None,
) -> dict:
    """``two_stage``, ``joint``, ``deep_sgrpo``, ``deep_baseline`` and ``joint_claim``. ``policy``: the
    S-GRPO run's point (``model``: its checkpoint, ``train_wall_s``); ``routers``: the routers stage
    on that policy (``rl.routing.demo_stage.routers_stage``, routers saved in ``routers_dir``); ``base``:
    the unrouted baseline's evaluation on the same problems (its ``n`` is the stage's); ``extra``:
    overrides of the joint run; ``static_plan``: the best single plan's point (FLOPs against ``base``),
    drawn beside them."""
    n_eval = base["n"]
    two_stage = method_point(routers, base)
    two_stage["train_wall_s"] = round(policy["train_wall_s"] + routers["train_wall_s"], 1)
    joint_dir, joint_wall = _train(
        [
            f"model.path={policy['model']}",
            f"layers.init_routers={routers_dir}",
            f"run.seed={seed}",
            f"run.out_dir={out / 'joint'}",
            *extra,
        ]
    )
    joint = heldout_point(joint_dir, joint_dir, n_eval, base)
    joint["train_wall_s"] = round(two_stage["train_wall_s"] + joint_wall, 1)
    joint["joint_run_wall_s"] = round(joint_wall, 1)
    result = {
        "joint": joint,
        "two_stage": two_stage,
        "deep_sgrpo": {**method_point(policy, base), "train_wall_s": policy["train_wall_s"]},
        "deep_baseline": method_point(base, base),
        "joint_claim": joint_claim(joint, two_stage, base),
    }
    plot_accuracy_vs_compute({**result, "static_plan": static_plan}, out / "joint.png")
    slim = {k: {kk: vv for kk, vv in v.items() if kk != "item_accuracy"} for k, v in result.items()}
    (out / "joint_summary.json").write_text(json.dumps(slim, indent=2))
    return result


def layer_levels(
    out: Path,
    summary: dict,
    seed: int,
    n_eval: int,
    routers_overrides=(),
    joint_overrides=(),
    save=lambda: None,
) -> None:
    """The demo's layer level on its S-GRPO policy, into ``summary``: the routers labelled and trained
    on the policy (``routers``; with the policy, ``two_stage``), the best static plan at their depth
    (``static_plan``), then joint from there (``joint``, ``joint_claim``; ``joint_overrides`` None:
    no joint run). ``n_eval`` held-out problems (the summary's baseline's when equal); ``save`` after
    each part."""
    from rl.routing.demo_stage import routers_stage
    from rl.routing.pipeline import RoutersRecipe

    base, policy = summary["baseline"], {**summary["sgrpo"], "train_wall_s": summary["sgrpo"]["wall_s"]}
    if n_eval != base["n"]:  # the layer-level points need the baseline and the policy on their own problems
        base = {**evaluate_heldout(make_backend("hf", summary["model"]), n_eval), "num_layers": base["num_layers"]}
        # the whole evaluation (its ``n`` and ``by_difficulty``): the routers stage reuses it as its unrouted point
        policy = {
            **evaluate_heldout(make_backend("hf", str(policy["model"])), n_eval),
            **{k: policy[k] for k in ("model", "train_wall_s")},
        }
    recipe = load_config(RoutersRecipe, ROUTERS_RECIPE, list(routers_overrides))
    r = routers_stage(out / "routers", recipe, seed, n_eval, policy["model"], policy)
    summary["routers"] = r
    if "static_plan" in r:  # the pruning baseline: the best single plan at the routers' mean depth
        static = r["static_plan"]
        point = method_point({**static, "item_accuracy": r.pop("static_item_accuracy")}, base)
        summary["static_plan"] = {**static, **point, "flops_ratio_vs_policy": static["flops_ratio"]}
    print(
        f"routers on the S-GRPO policy ({r['num_layers']}-layer tiny reasoner, {n_eval} held-out): accuracy "
        f"{r['baseline']['accuracy']:.3f} -> {r['accuracy']:.3f} ({r['accuracy_change_points']:+.1f} points) at "
        f"{r['layers_executed_mean']:.2f}/{r['num_layers']} layers ({r['flops_ratio']:.3f} x the policy's FLOPs); "
        f"claim {'holds' if r['claim']['holds'] else 'FAILS'}: {r['claim']}"
    )
    save()
    if joint_overrides is None:
        return
    j = joint_stage(
        out / "layers", policy, r, out / "routers" / "routers", base, seed, joint_overrides, summary.get("static_plan")
    )
    summary.update(j)
    for key in ("deep_sgrpo", "two_stage", "joint"):
        v, pc = j[key], j[key]["paired_vs_baseline"]
        print(
            f"{key}: accuracy {v['accuracy']:.3f} ({pc['points']:+.1f} points, paired 95% CI "
            f"{pc['ci95_points'][0]:+.1f} .. {pc['ci95_points'][1]:+.1f}), thinking {v['think_tokens']:.1f}, layers "
            f"{v['layers_executed_mean']:.2f}/{v['num_layers']}, FLOPs {v['flops_ratio']:.3f} x baseline "
            f"(thinking x layers {v['compute']:.3f}), trained in {v['train_wall_s']:.0f} s"
        )
    print(f"joint claim {'holds' if j['joint_claim']['holds'] else 'FAILS'}: {j['joint_claim']}")
    save()


def plot_accuracy_vs_compute(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [("deep_baseline", "baseline"), ("deep_sgrpo", "S-GRPO"), ("static_plan", "S-GRPO + static plan")]
    names += [("two_stage", "two-stage"), ("joint", "joint")]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in names:
        p = result.get(key)
        if not p:
            continue
        x = p["flops_ratio"]
        ax.scatter([x], [p["accuracy"]], label=f"{label} ({x:.2f}, {p['accuracy']:.3f})")
    ax.axvline(JOINT_CLAIM["max_flops_ratio"], color="grey", linestyle=":", linewidth=1)
    ax.set(
        xlabel="forward FLOPs per problem / the unrouted baseline's",
        ylabel="held-out accuracy",
        title="8-layer tiny reasoner: tokens and layers",
        xlim=(0, 1.05),
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
