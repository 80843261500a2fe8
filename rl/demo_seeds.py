"""``exitrl demo --seeds``: the demo once per recipe seed, each from its own model build, and the
figures across seeds (``seeds.json``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from rl.demo import DemoConfig, run_demo


def run_seeds(cfg: DemoConfig, seeds: list[int]) -> dict:
    """``run_demo`` for each recipe seed from scratch (its own model build and run) into
    ``cfg.out/seed-K`` (``cfg.seed`` left aside); ``seeds.json`` holds each seed's figures and their
    mean / min / max."""
    out = Path(cfg.out)
    per_seed = {}
    for k in seeds:
        s = run_demo(dataclasses.replace(cfg, out=str(out / f"seed-{k}"), seed=k))
        per_seed[k] = {
            "model_weights_sha256": s["model_info"].get("weights_sha256"),
            "baseline": _figures(s["baseline"]),
            **{name: {**_figures(s[name]), "claim": s[name]["claim"]} for name in s["runs"]},
            **{name: _layer_figures(s[name]) for name in LAYER_POINTS if name in s},
        }
        if "joint_claim" in s:
            per_seed[k]["joint_claim"] = s["joint_claim"]
        table = seeds_table(per_seed)
        (out / "seeds.json").write_text(json.dumps({"seeds": per_seed, "across_seeds": table}, indent=2))
    print(json.dumps(table, indent=2))
    return {"seeds": per_seed, "across_seeds": table}


# the layer level's method points a seed reports (``rl.joint_demo.layer_levels``)
LAYER_POINTS = ("static_plan", "two_stage", "joint")


def _layer_figures(r: dict) -> dict:
    f = {k: r[k] for k in ("accuracy", "flops_ratio", "layers_executed_mean")}
    f["accuracy_points"] = r["paired_vs_baseline"]["points"]
    return f


def _figures(r: dict) -> dict:
    f = {"accuracy": r["accuracy"], "think_tokens": r["think_tokens"]}
    f["by_difficulty"] = {d: v["accuracy"] for d, v in r["by_difficulty"].items()}
    if "paired_change" in r:
        f["accuracy_points"] = r["paired_change"]["overall"]["points"]
        f["accuracy_points_ci95"] = r["paired_change"]["overall"]["ci95_points"]
        f["think_cut"] = r["claim"]["think_cut"]
    return f


def seeds_table(per_seed: dict) -> dict:
    """Mean, min and max across seeds of each run's accuracy, thinking, change and claim."""

    def stats(xs: list[float]) -> dict:
        return {"mean": sum(xs) / len(xs), "min": min(xs), "max": max(xs)}

    runs = {name for s in per_seed.values() for name in s if isinstance(s[name], dict) and "accuracy" in s[name]}
    out = {}
    for name in sorted(runs):
        rows = [s[name] for s in per_seed.values() if name in s]
        keys = ("accuracy", "think_tokens", "accuracy_points", "think_cut", "flops_ratio", "layers_executed_mean")
        out[name] = {k: stats([r[k] for r in rows]) for k in keys if all(k in r for r in rows)}
        if "claim" in rows[0]:
            out[name]["claim_holds"] = f"{sum(r['claim']['holds'] for r in rows)}/{len(rows)}"
    claims = [s["joint_claim"]["holds"] for s in per_seed.values() if "joint_claim" in s]
    if claims:
        out["joint_claim_holds"] = f"{sum(claims)}/{len(claims)}"
    return out
