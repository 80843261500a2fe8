"""``exitrl eval --think-budgets``: the accuracy-thinking front with a forced exit, against an
independent path (generate B thinking tokens, append the exit prompt, answer: no branching), and
the command's report, table and plot."""

from __future__ import annotations

import json

import pytest

from rl.evaluation.budget_front import budget_front, parse_budgets
from rl.evaluation.scoring import EvalError


def test_budgets_parse_and_refuse_what_cannot_be_a_budget():
    assert parse_budgets("32,0,16,16") == [0, 16, 32]
    for bad in ("", "a,1", "-4,8"):
        with pytest.raises(EvalError, match="--think-budgets"):
            parse_budgets(bad)


def test_each_budget_cuts_the_chain_there_and_forces_the_exit(quick_model_dir):
    from rewards.verify import verify_answer
    from rl.data.problems import DataConfig, Problem, encode_prompts
    from rl.data.synthetic_task import heldout_problems
    from rollout.backends.hf import HFBackend
    from rollout.thinking import DEFAULT_EXIT_PROMPT, encode_in_context, think_tag_ids, thinking_span
    from rollout.types import SamplingConfig

    be = HFBackend.from_pretrained(str(quick_model_dir))
    tok = be.tokenizer
    problems = [Problem(p.id, p.problem, p.answer) for p in heldout_problems(3)]
    seen: list[tuple[str, str]] = []

    def verify_many(texts, golds):
        seen.extend(zip(texts, golds))
        return [verify_answer(t, g) for t, g in zip(texts, golds)]

    budgets = [0, 5, 10_000]
    front = budget_front(be, problems, budgets, verify_many, max_tokens=40, answer_max_tokens=8, progress=False)
    assert [p["budget"] for p in front] == [0, 5, 10_000, None]

    # the independent path: the chain, its first B thinking tokens, the exit prompt, a greedy answer
    open_id, close_id = think_tag_ids(tok)
    exit_ids = encode_in_context(tok, DEFAULT_EXIT_PROMPT)
    prompts = encode_prompts(tok, problems, DataConfig())
    chains = be.generate(prompts, SamplingConfig(max_tokens=40, temperature=0.0))
    spans = [thinking_span(g.completion_ids, open_id, close_id) for g in chains]
    lengths = [e - s for s, e, _ in spans]
    assert min(lengths) > 5  # the case happens: every chain is cut at 0 and at 5
    for point, b in zip(front, budgets):
        expected_think = [min(b, n) for n in lengths]
        assert point["think_tokens"] == pytest.approx(sum(expected_think) / 3)
        assert point["forced_share"] == pytest.approx(sum(b < n for n in lengths) / 3)
    texts = []
    for p, g, (s, _, _) in zip(prompts, chains, spans):
        for b in (0, 5):
            kept = list(g.completion_ids[: s + b])
            answer = be.generate([list(p) + kept + exit_ids], SamplingConfig(max_tokens=8, temperature=0.0))[0]
            texts.append(tok.decode(kept + exit_ids + list(answer.completion_ids), skip_special_tokens=False))
    forced_seen = [t for t, _ in seen if DEFAULT_EXIT_PROMPT.strip() in t]
    assert sorted(forced_seen) == sorted(texts)
    # no budget, and a budget longer than every chain: the chains themselves
    assert front[2]["think_tokens"] == front[3]["think_tokens"] == pytest.approx(sum(lengths) / 3)
    assert front[2]["accuracy"] == front[3]["accuracy"]


def test_eval_command_reports_plots_and_prints_the_front(quick_model_dir, tmp_path, capsys):
    from rl.cli import main

    args = ["eval", "--model", str(quick_model_dir), "--backend", "hf", "--benchmarks", "synthetic", "--limit", "3"]
    out = tmp_path / "report"
    assert main([*args, "--max-tokens", "24", "--think-budgets", "0,8", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| synthetic: think budget | accuracy |" in table and "| 8 |" in table
    front = json.loads((out / "report.json").read_text())["budget_front"]["synthetic"]
    assert [p["budget"] for p in front] == [0, 8, None] and all(p["n"] == 3 for p in front)
    assert front[0]["think_tokens"] == 0.0 and front[0]["forced_share"] == 1.0
    assert (out / "budget_front.png").stat().st_size > 0
    assert main([*args, "--think-budgets", "8,x"]) == 2
    assert "--think-budgets" in capsys.readouterr().err


def test_race_figures_by_hand():
    from rl.evaluation.race import front_at, front_budgets, underthinking_share

    base = {"a": 1.0, "b": 1.0, "c": 0.0, "d": 1.0}
    run = {"a": 1.0, "b": 0.0, "c": 1.0, "d": 0.0}
    assert underthinking_share(base, run) == 0.5  # b and d: right before, wrong after; c does not offset
    with pytest.raises(ValueError):
        underthinking_share(base, {"a": 1.0})
    assert front_budgets(60.0) == [0, 10, 20, 30, 40, 50, 60]
    front = [
        {"think_tokens": 0, "accuracy": 0.1},
        {"think_tokens": 20, "accuracy": 0.5},
        {"think_tokens": 40, "accuracy": 0.9},
    ]
    assert front_at(front, 10) == pytest.approx(0.3)
    assert front_at(front, 30) == pytest.approx(0.7)
    assert front_at(front, 50) == 0.9 and front_at(front, -1) == 0.1


def test_race_figures_compose_the_bar_from_the_summary(quick_model_dir, tmp_path):
    """race_figures on the quick model: the front at the baseline's budgets, the first-pass accuracy
    copied from the oracle per difficulty, and each part of race_claim from the numbers given."""
    from rl.data.problems import DataConfig, load_problems
    from rl.evaluation.race import front_at, front_budgets, plot_race, race_figures
    from rollout.backends.hf import HFBackend

    be = HFBackend.from_pretrained(str(quick_model_dir))
    ds = sorted(
        {str(p.meta["difficulty"]) for p in load_problems(DataConfig(source="synthetic", split="test", limit=4))}
    )
    summary = {
        "baseline": {"think_tokens": 12.0, "by_difficulty": {d: {"accuracy": 0.9} for d in ds}},
        "oracle": {"by_difficulty": {d: {"first_line_accuracy": 0.5, "recheck_share": 0.6} for d in ds}},
        "sgrpo": {"think_tokens": 6.0, "think_tokens_change": -0.5, "accuracy_change_points": -0.5,
                  "underthinking_share": 0.01, "accuracy": 0.95},
    }  # fmt: skip
    out = race_figures(be, summary, 4, "sgrpo", first_pass=True)
    assert [p["budget"] for p in out["budget_front"]] == [*front_budgets(12.0), None]
    assert all(summary["baseline"]["by_difficulty"][d]["first_pass_accuracy"] == 0.5 for d in ds)
    c = out["race_claim"]
    assert c["hardest_difficulty"] == max(ds, key=int) and c["hardest_full_minus_first_pass_points"] == 40.0
    assert c["best_think_cut"] == 0.5 and c["best_underthinking_share"] == 0.01
    budgeted = [p for p in out["budget_front"] if p["budget"] is not None]
    assert c["front_accuracy_at_best_thinking"] == round(front_at(budgeted, 6.0), 4)
    assert c["holds"] == (0.95 > front_at(budgeted, 6.0)) and out["best"] == "sgrpo"
    # the race plot reads the same summary: the front, the baseline and each run
    summary.update(out, runs={"sgrpo": "runs/sgrpo"}, oracle_think_tokens=5.0)
    summary["baseline"]["accuracy"] = 0.9
    plot_race(summary, tmp_path / "race.png")
    assert (tmp_path / "race.png").read_bytes()[:4] == b"\x89PNG"
