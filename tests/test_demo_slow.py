"""The README's main job end to end (slow: builds the tiny models, then on the 8-layer reasoner trains
S-GRPO, the routers on its policy and joint, evaluating 1000 held-out problems per method).
Run with `make test-slow`; CI runs the fast suite."""

import pytest


@pytest.mark.slow
def test_demo_cuts_thinking_without_losing_accuracy(tmp_path, monkeypatch):
    monkeypatch.delenv("EXITRL_CACHE", raising=False)  # the demo's own cache (~/.cache/exitrl), shared with `make demo`
    from rl.demo import DemoConfig, run_demo

    s = run_demo(DemoConfig(out=str(tmp_path / "demo"), n_eval=1000))
    claim = s["sgrpo"]["claim"]
    assert claim["think_cut"] >= 0.40  # at least 40 % fewer thinking tokens
    assert claim["accuracy_points"] >= -1.0  # at most 1 point below (paired, same problems)
    assert claim["worst_difficulty_points"] >= -3.0  # no difficulty more than 3 points below
    assert (tmp_path / "demo" / "demo.png").stat().st_size > 0
    r = s["routers"]  # the layer level: routers on the S-GRPO policy, 1000 held-out problems
    assert r["num_layers"] == r["baseline"]["num_layers"] == 8 and r["baseline"]["layers_executed_mean"] == 8.0
    assert r["layers_executed_mean"] <= 0.75 * r["num_layers"]
    assert r["accuracy"] >= r["baseline"]["accuracy"] - 0.01
    assert s["two_stage"]["flops_ratio"] < s["sgrpo"]["flops_ratio"] < 1.0
    assert s["wall_s_after_build"] <= 1800
