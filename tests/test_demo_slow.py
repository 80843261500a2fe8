"""The README's main job end to end (slow: builds the full tiny model, ~18 min on 2 cores).
Run with `make test-slow`; CI runs the fast suite only."""

import pytest


@pytest.mark.slow
def test_demo_cuts_thinking_without_losing_accuracy(tmp_path, monkeypatch):
    monkeypatch.delenv("EXITRL_CACHE", raising=False)  # the demo's own cache (~/.cache/exitrl), shared with `make demo`
    from rl.demo import run_demo

    s = run_demo(str(tmp_path / "demo"), n_eval=200)
    base, sgrpo = s["baseline"], s["sgrpo"]
    assert sgrpo["think_tokens"] <= 0.6 * base["think_tokens"]  # at least 40 % fewer thinking tokens
    assert sgrpo["accuracy"] >= base["accuracy"] - 0.01  # at most 1 point below
    assert (tmp_path / "demo" / "demo.png").stat().st_size > 0
