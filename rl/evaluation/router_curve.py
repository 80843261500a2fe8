"""Accuracy against layers executed: one evaluation per router skip bias, plus the full model."""

from __future__ import annotations

from rl.evaluation.run import EvalSettings, evaluate


def curve_point(report: dict, bench: str, skip_bias: float | None) -> dict:
    m = report["benchmarks"][bench]
    layers = m.get("layers") or {}
    return {
        "skip_bias": skip_bias,
        "accuracy": m["accuracy"],
        "accuracy_ci95": m["accuracy_ci95"],
        "layers_executed_mean": m.get("layers_executed_mean"),
        "layer_fraction": layers.get("layer_fraction", 1.0),
        "layer_flops_ratio": layers.get("layer_flops_ratio", 1.0),
        "think_tokens_mean": m.get("think_tokens_mean"),
    }


def router_curve(
    backend, benchmarks, settings: EvalSettings, biases: list[float], data_dir=None, limit=None, verify_many=None
) -> dict[str, list[dict]]:
    """Per benchmark: the full model's point (``skip_bias`` None) and one point per bias (the bias
    is added to every router's skip logit; positive skips more). ``backend`` stays as it was: each
    point evaluates a view of it (``with_skip_bias``)."""
    points: dict[str, list[dict]] = {}
    full = evaluate(backend.with_skip_bias(None), benchmarks, settings, data_dir, limit, verify_many)
    for b in full["benchmarks"]:
        points[b] = [curve_point(full, b, None)]
        points[b][0]["layers_executed_mean"] = float(backend.num_layers)
    for bias in biases:
        rep = evaluate(backend.with_skip_bias(bias), benchmarks, settings, data_dir, limit, verify_many)
        for b in rep["benchmarks"]:
            points[b].append(curve_point(rep, b, bias))
    return points
