"""exitrl bench commands refuse bad input with one line naming it (exit 2), before building anything."""

import pytest


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--repeats", "0"], "repeats must be >= 1, got 0"),
        (["--backend", "hf", "--compiled"], "--compiled is for --backend vllm only"),
    ],
)
def test_bench_rollout_refuses_bad_options_before_building_anything(argv, message, capsys, monkeypatch):
    import rl.models.tiny_reasoner as tiny
    from rl.cli import main

    def no_build(*a, **k):
        raise AssertionError("a model was built for a refused option")

    monkeypatch.setattr(tiny, "build_tiny_model", no_build)
    assert main(["bench", "rollout", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_bench_routed_names_a_missing_routers_folder(backend, tmp_path, capsys):
    from rl.cli import main

    missing = tmp_path / "no_routers"
    assert main(["bench", "routed", "--routers", str(missing), "--backend", backend]) == 2
    err = capsys.readouterr().err
    assert err.startswith("exitrl bench routed: ")
    assert f"{missing}: no routers.safetensors" in err


def test_bench_serve_figures_by_hand():
    """One strategy's figures from its requests: percentiles, first finishes, the losers' tokens as
    vLLM's generated tokens minus the winners', and the ratios the bar reads."""
    from rl.bench.serve import ratios, summarise

    rows = [
        {"latency": 1.0, "ok": True, "sequential": 10, "total": 30, "ttff": 0.9},
        {"latency": 3.0, "ok": False, "sequential": 20, "total": 60, "ttff": 2.9},
        {"latency": 2.0, "ok": True, "sequential": 30, "total": 90, "ttff": 1.9},
    ]
    s = summarise(rows, wall=4.0, strategy="ffs", generated=150.0)
    assert s["p50_latency_s"] == 2.0 and s["p99_latency_s"] == 3.0 and s["ttff_p50_s"] == 1.9
    assert s["losers_tokens_mean"] == (150 - 60) / 3 and s["upstream_generated_tokens"] == 150
    assert s["accuracy"] == pytest.approx(2 / 3) and s["requests_per_s"] == 0.75 and s["output_tokens_per_s"] == 45
    lo, hi = s["accuracy_ci95"]
    assert 0 <= lo <= 2 / 3 <= hi <= 1
    plain = summarise(rows, wall=4.0, strategy="plain", generated=None)
    assert plain["losers_tokens_mean"] is None and plain["upstream_generated_tokens"] is None
    r = ratios(
        {
            "ffs@4": {**s},
            "maj@4": {**s, "p50_latency_s": 4.0, "total_tokens_mean": 120},
            "plain": {**s, "p50_latency_s": 2.5},
        },
        4,
    )
    assert r == {"ffs_p50_latency_ratio": 0.5, "ffs_vs_plain_p50_latency_ratio": 0.8, "ffs_total_tokens_ratio": 0.5}
