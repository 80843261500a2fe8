"""exitrl eval: scoring saved responses (golds 100%, wrong 0%), majority / FFS accounting on
constructed records, the tiny model end to end on `smoke`, and resuming an interrupted run."""

import json

import pytest

from rl.evaluation.command import run_eval
from rl.evaluation.run import EvalSettings, load_benchmark
from rl.evaluation.scoring import EvalError, accuracy_efficiency_score, bootstrap_ci, score_records


def _verify_many(responses, golds):
    from rewards.verify import verify_answer

    return [verify_answer(r, g) for r, g in zip(responses, golds)]


def _rescore(capsys, path, bench, data_dir) -> dict:
    """``exitrl eval --responses PATH --json``: the benchmark's metrics."""
    from rl.cli import main

    assert main(["eval", "--responses", str(path), "--benchmarks", bench, "--data-dir", str(data_dir), "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["benchmarks"][bench]


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.mark.parametrize("bench", ["smoke", "aime24", "amc23"])
def test_gold_responses_score_100_and_wrong_ones_0(shared_dir, tmp_path, capsys, bench):

    probs = load_benchmark(bench, str(shared_dir / "benchmarks"))
    right, wrong = tmp_path / "right.jsonl", tmp_path / "wrong.jsonl"
    _write(
        right,
        [
            {
                "benchmark": bench,
                "id": p.id,
                "sample": 0,
                "response": f"<think>ok</think> The answer is $\\boxed{{{p.answer}}}$.",
            }
            for p in probs
        ],
    )
    _write(wrong, [{"id": p.id, "sample": 0, "response": "<think>hmm</think> \\boxed{-123456789}"} for p in probs])
    for path, want in ((right, 1.0), (wrong, 0.0)):
        report = _rescore(capsys, path, bench, shared_dir / "benchmarks")
        assert report["accuracy"] == want
        assert report["n_items"] == len(probs)


def test_majority_and_ffs_accounting_on_constructed_records(shared_dir):
    probs = load_benchmark("smoke", str(shared_dir / "benchmarks"))[:2]
    a, b = probs
    recs = [
        # item a: 2 of 3 samples say the gold -> maj correct, pass@1 = 2/3
        {
            "id": a.id,
            "sample": 0,
            "response": f"\\boxed{{{a.answer}}}",
            "completion_tokens": 10,
            "think_tokens": 6,
            "closed": True,
        },
        {
            "id": a.id,
            "sample": 1,
            "response": "\\boxed{999999}",
            "completion_tokens": 20,
            "think_tokens": 15,
            "closed": True,
        },
        {
            "id": a.id,
            "sample": 2,
            "response": f"\\boxed{{{a.answer}}}",
            "completion_tokens": 30,
            "think_tokens": 25,
            "closed": True,
        },
        # item b: majority wrong
        {
            "id": b.id,
            "sample": 0,
            "response": "\\boxed{999999}",
            "completion_tokens": 40,
            "think_tokens": 40,
            "closed": False,
        },
        {
            "id": b.id,
            "sample": 1,
            "response": "\\boxed{999999}",
            "completion_tokens": 50,
            "think_tokens": 45,
            "closed": True,
        },
        {
            "id": b.id,
            "sample": 2,
            "response": f"\\boxed{{{b.answer}}}",
            "completion_tokens": 60,
            "think_tokens": 55,
            "closed": True,
        },
    ]
    maj = score_records(recs, probs, "majority", 3, _verify_many)
    assert maj["metric"] == "maj@3" and maj["accuracy"] == 0.5
    assert maj["total_tokens_mean"] == (60 + 150) / 2 and maj["sequential_tokens_mean"] == (30 + 60) / 2
    assert maj["unclosed_thinking_share"] == pytest.approx(1 / 6)
    assert maj["think_tokens_median"] == (25 + 40) / 2
    sample = score_records(recs, probs, "sample", 3, _verify_many)
    assert sample["accuracy"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    # FFS: one winner record per item carrying both token counts
    ffs = [
        {
            "id": a.id,
            "sample": 0,
            "response": f"\\boxed{{{a.answer}}}",
            "completion_tokens": 12,
            "total_tokens": 48,
            "sequential_tokens": 12,
        },
        {
            "id": b.id,
            "sample": 0,
            "response": "\\boxed{1}",
            "completion_tokens": 20,
            "total_tokens": 70,
            "sequential_tokens": 20,
        },
    ]
    r = score_records(ffs, probs, "ffs", 4, _verify_many)
    assert r["metric"] == "ffs@4" and r["accuracy"] == 0.5
    assert r["total_tokens_mean"] == 59 and r["sequential_tokens_mean"] == 16


def test_aes_and_bootstrap():
    # 30% shorter at +10% relative accuracy: 1*0.3 + 3*0.1
    assert accuracy_efficiency_score(0.88, 70, 0.8, 100) == pytest.approx(0.3 + 0.3)
    # 30% shorter at -10% relative accuracy: 0.3 - 5*0.1
    assert accuracy_efficiency_score(0.72, 70, 0.8, 100) == pytest.approx(0.3 - 0.5)
    lo, hi = bootstrap_ci([1.0] * 50 + [0.0] * 50)
    assert 0.35 < lo < 0.5 < hi < 0.65


def test_errors_name_the_problem(shared_dir, tmp_path):
    with pytest.raises(EvalError, match="nope.jsonl"):
        load_benchmark("nope", str(shared_dir / "benchmarks"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "sample": 0}\n{"id": "y", "sample": 0, "response": "1"}\n')
    with pytest.raises(EvalError, match="line 1: missing field 'response'"):
        run_eval(["smoke"], str(shared_dir / "benchmarks"), EvalSettings(), responses=str(bad))


def test_tiny_model_end_to_end_and_resume(shared_dir, quick_model_dir, tmp_path, monkeypatch):
    import rl.evaluation.run as ev

    data = str(shared_dir / "benchmarks")
    saved = tmp_path / "responses.jsonl"
    settings = EvalSettings(strategy="sample", n=2, temperature=1.0, max_tokens=24)
    calls = []
    real = ev.generate_records

    def counting(backend, bench, problems, s, done, sink):
        calls.append(len(done))
        return real(backend, bench, problems, s, done, sink)

    monkeypatch.setattr(ev, "generate_records", counting)

    def run():
        return run_eval(
            ["smoke", "synthetic"],
            data,
            settings,
            model=str(quick_model_dir),
            backend="hf",
            save_responses=str(saved),
            limit=3,
        )

    report = run()
    recs = [json.loads(line) for line in saved.read_text().splitlines()]
    assert len(recs) == 2 * 3 * 2  # 2 benchmarks x 3 items x 2 samples
    for b in ("smoke", "synthetic"):
        m = report["benchmarks"][b]
        assert m["n_items"] == 3 and 0.0 <= m["accuracy"] <= 1.0
        assert m["completion_tokens_mean"] <= 24 and m["think_tokens_mean"] <= m["completion_tokens_mean"]

    # interrupt: drop the last 3 records (and cut one line in half, as a kill mid-write would)
    lines = saved.read_text().splitlines()
    saved.write_text("\n".join(lines[:-3]) + "\n" + lines[-3][:10])
    before = saved.read_text().count("\n")
    run()
    after = [json.loads(line) for line in saved.read_text().splitlines() if line.strip().endswith("}")]
    keys = [(r["benchmark"], r["id"], r["sample"]) for r in after]
    assert len(set(keys)) == 12  # everything present once: nothing regenerated twice
    assert len(keys) - before == 3  # only the missing three were generated


def test_identical_samples_keep_distinct_sample_indices(shared_dir, quick_model_dir):
    """Two samples with equal text (e.g. a peaked model) are still samples 0 and 1."""
    from transformers import AutoTokenizer

    from rl.evaluation.run import generate_records
    from rollout.types import Generation

    tok = AutoTokenizer.from_pretrained(quick_model_dir)

    class Same:
        tokenizer = tok

        def generate(self, prompt_ids, sampling):
            return [
                Generation(p, [5, 6], [0.0, 0.0], "stop", i)
                for i, p in enumerate(prompt_ids)
                for _ in range(sampling.n)
            ]

    probs = load_benchmark("smoke", str(shared_dir / "benchmarks"))[:2]
    recs = []
    generate_records(Same(), "smoke", probs, EvalSettings(strategy="sample", n=3), set(), recs.append)
    assert sorted((r["id"], r["sample"]) for r in recs) == sorted((p.id, k) for p in probs for k in range(3))


def test_demo_evaluation_is_exitrl_eval_with_one_thinking_count(quick_model_dir, tmp_path, capsys):
    """The demo's held-out evaluation and `exitrl eval --benchmarks synthetic` are one path: same
    accuracy, same thinking tokens, same per-difficulty breakdown; thinking is counted by
    rollout.thinking.thinking_tokens (tags excluded) on the generated ids."""
    from rl.cli import main
    from rl.data.prompts import build_prompt
    from rl.data.synthetic_task import heldout_problems
    from rl.evaluation.heldout import evaluate_heldout
    from rollout.backends.hf import HFBackend
    from rollout.thinking import think_tag_ids, thinking_tokens
    from rollout.types import SamplingConfig

    be = HFBackend.from_pretrained(str(quick_model_dir))
    demo = evaluate_heldout(be, 6, max_tokens=32, progress=False)
    args = ["eval", "--model", str(quick_model_dir), "--backend", "hf", "--benchmarks", "synthetic", "--limit", "6"]
    assert main([*args, "--max-tokens", "32", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["benchmarks"]["synthetic"]
    assert demo["n"] == report["n_items"] == 6
    assert demo["accuracy"] == report["accuracy"]
    assert demo["think_tokens"] == pytest.approx(report["think_tokens_mean"])
    assert set(demo["by_difficulty"]) == set(report["by_difficulty"])
    assert sum(v["n"] for v in demo["by_difficulty"].values()) == 6
    # the count itself, on the ids the backend generates for the same prompts
    tok = be.tokenizer
    prompts = [tok(build_prompt(tok, p.problem), add_special_tokens=False)["input_ids"] for p in heldout_problems(6)]
    gens = be.generate(prompts, SamplingConfig(max_tokens=32, temperature=0.0))
    open_id, close_id = think_tag_ids(tok)
    counts = [thinking_tokens(g.completion_ids, open_id, close_id) for g in gens]
    assert demo["think_tokens"] == pytest.approx(sum(counts) / len(counts))
    # forward FLOPs per problem: every prompt and generated token through the model's layers
    from rollout.routing.compute import generation_flops

    flops = [generation_flops(be.model_config, len(p), len(g.completion_ids)) for p, g in zip(prompts, gens)]
    assert report["flops_per_problem"] == pytest.approx(sum(flops) / 6)


GPQA_ROWS = [  # the hub dataset's column layout (Idavidrein/gpqa, gpqa_diamond)
    {
        "Record ID": f"rec{i}",
        "Question": q,
        "Correct Answer": c,
        "Incorrect Answer 1": w1,
        "Incorrect Answer 2": w2,
        "Incorrect Answer 3": w3,
        "Subdomain": "Physics",
    }
    for i, (q, c, w1, w2, w3) in enumerate(
        [
            ("Which particle mediates the electromagnetic force?", "photon", "gluon", "W boson", "graviton"),
            ("What is the spin of an electron?", "1/2", "1", "0", "3/2"),
            ("Which element has atomic number 6?", "carbon", "nitrogen", "oxygen", "boron"),
            ("What is the SI unit of inductance?", "henry", "tesla", "weber", "farad"),
            ("Which quark is the heaviest?", "top", "bottom", "charm", "strange"),
        ]
    )
]


def test_gpqa_is_multiple_choice_graded_on_the_letter(tmp_path, capsys):

    (tmp_path / "gpqa_diamond.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GPQA_ROWS))
    probs = load_benchmark("gpqa_diamond", str(tmp_path))
    assert [p.id for p in probs] == [f"rec{i}" for i in range(5)]
    assert [p.answer for p in probs] == [p.answer for p in load_benchmark("gpqa_diamond", str(tmp_path))]  # fixed order
    assert len({p.answer for p in probs}) > 1  # the correct option is not always in one place
    for p, row in zip(probs, GPQA_ROWS):
        assert p.problem.startswith(row["Question"]) and p.answer in "ABCD"
        options = [line for line in p.problem.splitlines() if line[:3] in ("A) ", "B) ", "C) ", "D) ")]
        assert sorted(o[3:] for o in options) == sorted(
            row[k] for k in ("Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")
        )
        assert f"{p.answer}) {row['Correct Answer']}" in options
    letters = tmp_path / "letters.jsonl"
    texts = tmp_path / "texts.jsonl"
    _write(letters, [{"id": p.id, "sample": 0, "response": f"</think> \\boxed{{{p.answer}}}"} for p in probs])
    _write(
        texts,
        [
            {"id": p.id, "sample": 0, "response": f"</think> \\boxed{{{r['Correct Answer']}}}"}
            for p, r in zip(probs, GPQA_ROWS)
        ],
    )
    for path, want in ((letters, 1.0), (texts, 0.0)):
        assert _rescore(capsys, path, "gpqa_diamond", tmp_path)["accuracy"] == want


def test_paired_bootstrap_ci_of_an_accuracy_change():
    from rl.evaluation.scoring import paired_bootstrap_ci

    before = [1.0] * 90 + [0.0] * 10
    after = [1.0] * 85 + [0.0] * 5 + [1.0] * 10  # 5 items lost, 10 gained: +5 points
    lo, hi = paired_bootstrap_ci(before, after)
    assert lo < 0.05 < hi and hi - lo < 0.15
    assert paired_bootstrap_ci(before, before) == (0.0, 0.0)  # identical runs: no uncertainty when paired
    with pytest.raises(ValueError, match="differ in length"):
        paired_bootstrap_ci(before, after[:-1])


def test_synthetic_failures_are_classified_by_what_the_thinking_wrote():
    from rl.data.synthetic_task import forced_exit_completion, heldout_problems
    from rl.evaluation.heldout import classify_failure, failure_kinds

    p = next(q for q in heldout_problems(50) if q.difficulty == 4)
    full = p.completion()
    cut = len("\n" + "\n".join(p.step_lines()[:3]) + "\n")  # three of four steps written
    assert classify_failure(p, forced_exit_completion(p, cut)) == "stopped_early"
    wrong_step = p.step_lines()[1][:-1] + str((int(p.step_lines()[1][-1]) + 1) % 10)
    assert classify_failure(p, full.replace(p.step_lines()[1], wrong_step)) == "miscomputed"
    assert classify_failure(p, full.replace(f"boxed{{{p.answer}}}", "boxed{x}")) == "overthought"
    recs = [{"id": p.id, "response": forced_exit_completion(p, cut)}]
    other = next(q.id for q in heldout_problems(50) if q.id != p.id)
    assert failure_kinds(recs, {p.id: 0.0, other: 1.0}) == {p.id: "stopped_early"}
