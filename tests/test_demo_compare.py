"""The compute-matched comparison's table and plot from a summary, and the paired change (no training:
numbers made up here)."""

import pytest

from rl.demo import COMPUTE_MATCHED, compare_table, demo_runs, plot_compute


def _run(acc, think, tokens, wall, points):
    hist = [{"step": 0, "accuracy": 0.9, "think_tokens": 100.0, "rollout_tokens": 0, "wall_s": 0.0}]
    hist.append({"step": 4, "accuracy": acc, "think_tokens": think, "rollout_tokens": tokens, "wall_s": wall})
    return {
        "accuracy": acc,
        "think_tokens": think,
        "think_tokens_change": think / 100.0 - 1,
        "paired_change": {"overall": {"points": points, "ci95_points": [points - 1, points + 1]}},
        "rollout_tokens": tokens,
        "wall_s": wall,
        "oracle_ratio": think / 40.0,
        "eval_history": hist,
    }


def test_compare_runs_and_table(tmp_path):
    assert list(demo_runs(True)) == ["sgrpo", "grpo", "ffs_group", "ffs_group_zero"]
    assert list(demo_runs(True, "recheck")) == ["sgrpo", "grpo", "ffs_group", "grpo_length"]
    assert "loss.reward=kimi_length" in demo_runs(True, "recheck")["grpo_length"]
    assert set(COMPUTE_MATCHED) == (set(demo_runs(True)) | set(demo_runs(True, "recheck"))) - {"sgrpo"}
    summary = {
        "baseline": {"accuracy": 0.9, "think_tokens": 100.0},
        "oracle_think_tokens": 40.0,
        "runs": {"sgrpo": "a", "ffs_group": "b"},
        "sgrpo": {**_run(0.91, 50.0, 1000, 12.5, 1.0), "underthinking_share": 0.01},
        "ffs_group": {**_run(0.88, 60.0, 1010, 8.0, -2.0), "underthinking_share": 0.05},
        "budget_front": [{"budget": 0, "accuracy": 0.2, "think_tokens": 0.0}],
    }
    lines = compare_table(summary).splitlines()
    assert lines[2] == "| baseline | 0.900 | | 100.0 | 2.50 | | | |"
    assert lines[3] == "| sgrpo | 0.910 | +1.0 (+0.0 .. +2.0) | 50.0 (-50 %) | 1.25 | 0.010 | 1000 | 12.5 |"
    assert lines[4] == "| ffs_group | 0.880 | -2.0 (-3.0 .. -1.0) | 60.0 (-40 %) | 1.50 | 0.050 | 1010 | 8.0 |"
    assert lines[5] == "| exit oracle (baseline chains) | | | 40.0 | 1.00 | | | |"
    assert lines[6] == "| baseline, think budget 0 | 0.200 | | 0.0 | | | | |"
    plot_compute(summary, tmp_path / "compare.png")
    assert (tmp_path / "compare.png").stat().st_size > 10_000


def test_paired_change_is_per_problem_overall_and_by_difficulty():
    from rl.demo import paired_change

    ids = [f"p{i}" for i in range(6)]
    base = {
        "item_accuracy": dict(zip(ids, [1, 1, 0, 1, 1, 1])),
        "difficulty_ids": {"2": ids[:3], "3": ids[3:]},
    }
    run = {"item_accuracy": dict(zip(ids, [1, 1, 1, 0, 0, 1]))}
    c = paired_change(base, run)
    assert c["overall"]["points"] == pytest.approx(100 * (4 - 5) / 6)
    assert c["by_difficulty"]["2"]["points"] == pytest.approx(100 / 3)  # p2 gained
    assert c["by_difficulty"]["3"]["points"] == pytest.approx(-200 / 3)  # p3, p4 lost
    assert c["by_difficulty"]["3"]["n"] == 3
    lo, hi = c["by_difficulty"]["3"]["ci95_points"]
    assert lo <= -200 / 3 <= hi
    with pytest.raises(ValueError, match="same problems"):
        paired_change(base, {"item_accuracy": dict(zip(ids[:5], [1] * 5))})
