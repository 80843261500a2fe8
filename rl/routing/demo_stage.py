"""The demo's layer-level stage: the 8-layer tiny reasoner, router labels, router training, and
the held-out evaluation of the routed model against the same model unrouted."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from rl.evaluation.heldout import evaluate_heldout
from rl.evaluation.scoring import paired_points
from rl.models.tiny_reasoner import build_tiny_model, deep_recipe
from rl.routing.pipeline import RoutersRecipe, load_model, run_label, run_train
from rollout.backends.factory import make_backend

# the bar of the layer level: at most 75 % of the layers, at most 1 point below the unrouted model
ROUTER_CLAIM = {"max_layer_fraction": 0.75, "max_points_lost": 1.0}


def best_static_plan(plans: list[dict], max_executed: float) -> dict:
    """The plan a reviewer would try before routers: of the label search's vocabulary (``plans``:
    ``plan``, ``executed``, ``pass_rate`` on the label problems), the one with the highest pass rate
    among those running at most ``max_executed`` layer passes (ties: fewer passes)."""
    fits = [p for p in plans if p["executed"] <= max_executed + 1e-9]
    if not fits:
        raise ValueError(f"no plan of the vocabulary runs at most {max_executed} layer passes")
    return max(fits, key=lambda p: (p["pass_rate"], -p["executed"]))


def constant_routers(plan: list[int], hidden_size: int):
    """Routers that decide ``plan`` for every input (zero output weights, the plan's action biased
    by 50): a static plan evaluated through the routers' own path."""
    import torch

    from rollout.routing.routers import NUM_ACTIONS, LayerRouters, RouterConfig

    routers = LayerRouters(RouterConfig(len(plan), hidden_size))
    with torch.no_grad():
        routers.w2.zero_()
        routers.b2.copy_(50.0 * torch.nn.functional.one_hot(torch.tensor(plan), NUM_ACTIONS).float())
    return routers


def static_plan_point(model, tok, vocabulary: dict, routed_layers: float, base: dict, n_eval: int) -> dict:
    """``best_static_plan`` at the routers' mean executed layers, evaluated like the routers; when the
    vocabulary has no plan that cheap, its cheapest plan (``within_routers_depth`` false)."""
    plans = vocabulary["plans"]
    cheapest = min(p["executed"] for p in plans)
    within = cheapest <= routed_layers + 1e-9
    chosen = best_static_plan(plans, routed_layers if within else cheapest)
    routers = constant_routers(chosen["plan"], model.config.hidden_size)
    r = evaluate_heldout(make_backend("hf", "", model=model, tokenizer=tok, routers=routers), n_eval)
    return {
        "plan": chosen["plan"],
        "label_pass_rate": chosen["pass_rate"],
        "within_routers_depth": within,
        "layers_executed_mean": r["layers_executed_mean"],
        "accuracy": r["accuracy"],
        "accuracy_ci95": r["accuracy_ci95"],
        "think_tokens": r["think_tokens"],
        "accuracy_change_points": 100 * (r["accuracy"] - base["accuracy"]),
        "flops_per_problem": r["flops_per_problem"],
        "flops_ratio": r["flops_per_problem"] / base["flops_per_problem"],
        "item_accuracy": r["item_accuracy"],
    }


def routers_stage(
    out_dir: Path,
    recipe: RoutersRecipe,
    seed: int = 0,
    n_eval: int = 200,
    model_dir: str | Path | None = None,
    base: dict | None = None,
) -> dict:
    """Label and train routers (``recipe``, its model replaced by ``model_dir``, default the deep tiny
    reasoner of ``seed``, built or reused), evaluate the model routed and unrouted on ``n_eval``
    held-out problems (``base``: its unrouted evaluation, when already made on those problems); the
    summary's ``routers`` object (with that unrouted ``baseline``; ``item_accuracy``: the routed model's
    verdicts), and ``static_plan`` when the labels made a vocabulary."""
    t0 = time.time()
    model_dir = model_dir or build_tiny_model(deep_recipe(seed))
    recipe = dataclasses.replace(recipe, model=str(model_dir))
    model_tok = load_model(str(model_dir))
    label_stats = run_label(recipe, out_dir, model_tok=model_tok)
    t_label = time.time() - t0
    train_metrics = run_train(recipe, out_dir, model_tok=model_tok)
    t_trained = time.time() - t0
    model, tok, _ = model_tok
    L = model.config.num_hidden_layers
    if base is None or base.get("n") != n_eval:
        base = evaluate_heldout(make_backend("hf", "", model=model, tokenizer=tok), n_eval)
    routed_backend = make_backend("hf", "", model=model, tokenizer=tok, routers=out_dir / "routers")
    routed = evaluate_heldout(routed_backend, n_eval)
    points = 100 * (routed["accuracy"] - base["accuracy"])
    fraction = routed["layers_executed_mean"] / L
    result = {
        "model": str(model_dir),
        "accuracy": routed["accuracy"],
        "accuracy_ci95": routed["accuracy_ci95"],
        "think_tokens": routed["think_tokens"],
        "layers_executed_mean": routed["layers_executed_mean"],
        "num_layers": L,
        "layer_fraction": fraction,
        "flops_per_problem": routed["flops_per_problem"],
        "flops_ratio": routed["flops_per_problem"] / base["flops_per_problem"],
        "layers": routed.get("layers"),
        "by_difficulty": {k: {"accuracy": v["accuracy"], "n": v["n"]} for k, v in routed["by_difficulty"].items()},
        "baseline": {
            "accuracy": base["accuracy"],
            "accuracy_ci95": base["accuracy_ci95"],
            "think_tokens": base["think_tokens"],
            "layers_executed_mean": float(L),
            "num_layers": L,
            "flops_per_problem": base["flops_per_problem"],
            "flops_ratio": 1.0,
            "by_difficulty": {k: {"accuracy": v["accuracy"], "n": v["n"]} for k, v in base["by_difficulty"].items()},
        },
        "accuracy_change_points": points,
        "paired_change_points": paired_points(base["item_accuracy"], routed["item_accuracy"]),
        "claim": {
            "layer_fraction": round(fraction, 4),
            "layer_fraction_ok": fraction <= ROUTER_CLAIM["max_layer_fraction"],
            "accuracy_points": round(points, 2),
            "accuracy_ok": points >= -ROUTER_CLAIM["max_points_lost"],
        },
        "label_stats": label_stats,
        "router_f1_heldout": train_metrics.get("heldout_f1"),
        "router_train": {k: train_metrics.get(k) for k in ("train_prompts", "heldout_prompts", "final_loss")},
        "label_wall_s": round(t_label, 1),
        "train_wall_s": round(t_trained, 1),  # labels and router training, evaluations left out
        "wall_s": round(time.time() - t0, 1),
    }
    result["claim"]["holds"] = result["claim"]["layer_fraction_ok"] and result["claim"]["accuracy_ok"]
    static_items = None
    if label_stats.get("vocabulary"):
        static = static_plan_point(model, tok, label_stats["vocabulary"], routed["layers_executed_mean"], base, n_eval)
        static["routers_minus_static_paired"] = paired_points(static["item_accuracy"], routed["item_accuracy"])
        static_items = static.pop("item_accuracy")
        result["static_plan"] = static
        result["distinct_plans"] = (routed.get("layers") or {}).get("distinct_plans")
    (out_dir / "routers_summary.json").write_text(json.dumps(result, indent=2))
    items = {"item_accuracy": routed["item_accuracy"]}
    if static_items is not None:
        items["static_item_accuracy"] = static_items
    return {**result, **items}
