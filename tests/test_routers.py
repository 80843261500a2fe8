"""Router labels (search), losses, training, and routed generation through the product's paths."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from rl.routing.label_search import (
    LabelSearchConfig,
    neighbours,
    read_labels,
    score_plans,
    search,
)
from rl.routing.router_losses import effective_number_weights, focal_loss
from rl.routing.router_training import RouterTrainConfig, per_class_f1, train_routers


def _rule_scorer(required: set[int], calls: list[int]):
    """good iff every required layer runs once and nothing repeats."""

    def score(plans: torch.Tensor) -> torch.Tensor:
        calls.append(len(plans))
        ok = torch.ones(len(plans), dtype=torch.bool)
        for layer in required:
            ok &= plans[:, layer] == 1
        return ok & (plans <= 1).all(1)

    return score


def test_search_finds_the_shortest_correct_plan():
    calls: list[int] = []
    res = search(_rule_scorer({0, 1, 2, 3, 5}, calls), 8, LabelSearchConfig(budget=8), key="p")
    assert res.full_correct
    assert res.plan == [1, 1, 1, 1, 0, 1, 0, 0]  # layers 4, 6, 7 are the skippable ones
    assert res.scored == sum(calls) and res.scored < 3**8  # far from exhaustive


def test_search_keeps_all_layers_when_nothing_can_go():
    res = search(_rule_scorer(set(range(6)), []), 6, LabelSearchConfig(budget=4))
    assert res.plan == [1] * 6 and res.full_correct

    def nothing(plans):
        return torch.zeros(len(plans), dtype=torch.bool)

    res = search(nothing, 6, LabelSearchConfig(budget=4))
    assert res.plan == [1] * 6 and not res.full_correct and res.scored == 1


def test_neighbours_skip_one_or_two_or_repeat_one():
    kids = neighbours((1, 1, 1))
    assert len(kids) == 3 + 2 + 3
    assert (0, 0, 1) in kids and (1, 2, 1) in kids and (0, 1, 0) not in kids
    assert neighbours((1, 0, 1), allow_repeat=False) == [(0, 0, 1), (1, 0, 0)]


def test_effective_number_weights_by_hand():
    w = effective_number_weights(torch.tensor([10, 100, 0]), beta=0.9)
    raw0, raw1 = 0.1 / (1 - 0.9**10), 0.1 / (1 - 0.9**100)
    scale = 2 / (raw0 + raw1)
    assert w.tolist() == pytest.approx([raw0 * scale, raw1 * scale, 0.0], rel=1e-5)
    assert w[0] > w[1]  # the rarer class weighs more


def test_focal_loss_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p = [0.25, 0.75]
    got = focal_loss(logits, torch.tensor([1]), torch.tensor([1.0, 2.0]), gamma=2.0)
    assert float(got) == pytest.approx(2.0 * 0.25**2 * -math.log(0.75), rel=1e-5)
    z = torch.randn(5, 3)
    y = torch.tensor([0, 1, 2, 1, 0])
    ce = torch.nn.functional.cross_entropy(z, y)
    assert float(focal_loss(z, y, torch.ones(3), gamma=0.0)) == pytest.approx(float(ce), rel=1e-5)


def test_router_training_learns_a_rule_from_features():
    """Layer 3 is skipped exactly when feature 0 of its inputs is positive: held-out F1 shows it."""
    g = torch.Generator().manual_seed(0)
    N, L, W, d = 400, 4, 2, 16
    means = torch.randn(N, L, W, d, generator=g)
    valid = torch.ones(N, W, dtype=torch.bool)
    labels = torch.ones(N, L, dtype=torch.long)
    labels[:, 3] = torch.where(means[:, 3, :, 0].mean(1) > 0, 0, 1)
    routers, m = train_routers(means, valid, labels, RouterTrainConfig(epochs=40, lr=3e-3, router_hidden=32))
    assert m["heldout_prompts"] == 40
    assert m["heldout_f1"]["skip"] >= 0.85 and m["heldout_f1"]["repeat"] is None
    assert m["loss_curve"][-1] < m["loss_curve"][0] / 2


def test_per_class_f1_by_hand():
    pred = torch.tensor([0, 0, 1, 1, 2])
    gold = torch.tensor([0, 1, 1, 1, 1])
    f1 = per_class_f1(pred, gold)
    assert f1["skip"] == pytest.approx(2 / 3, abs=1e-4)  # tp 1, fp 1, fn 0
    assert f1["execute"] == pytest.approx(4 / 6, abs=1e-4)  # tp 2, fp 0, fn 2: 2tp / (2tp + fp + fn)
    assert f1["repeat"] is None


def test_read_labels_drops_a_torn_tail_and_names_bad_lines(tmp_path):
    f = tmp_path / "labels.jsonl"
    f.write_text('{"id": "a", "plan": [1, 0]}\n{"id": "b", "pl')
    assert [r["id"] for r in read_labels(f)] == ["a"]
    f.write_text('{"id": "a", "plan": [1, 0]}\nnot json\n{"id": "c", "plan": [1, 1]}\n')
    with pytest.raises(ValueError, match=r"labels.jsonl:2"):
        read_labels(f)
    f.write_text('{"id": "a"}\n')
    with pytest.raises(ValueError, match="lacks 'plan'"):
        read_labels(f)


@pytest.fixture(scope="module")
def quick(quick_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(quick_model_dir).eval(), AutoTokenizer.from_pretrained(quick_model_dir)


def test_labels_training_and_routed_eval_end_to_end(quick, quick_model_dir, tmp_path):
    """run_label -> run_train -> exitrl eval --routers: real files, resumable labels, routed records."""
    from rl.routing.pipeline import RoutersRecipe, run_label, run_train

    recipe = RoutersRecipe(
        model=str(quick_model_dir),
        problems=6,
        agreement_sample=2,
        max_tokens=48,
        label=LabelSearchConfig(budget=2),
        train=RouterTrainConfig(epochs=3, heldout_fraction=0.0),
    )
    stats = run_label(recipe, tmp_path, progress=False, model_tok=(*quick, str(quick_model_dir)))
    rows = read_labels(tmp_path / "labels.jsonl")
    assert stats["problems"] == 6 == len(rows)
    assert sum(stats["class_counts"].values()) == 6 * 4
    again = run_label(recipe, tmp_path, progress=False, model_tok=(*quick, str(quick_model_dir)))
    assert len(read_labels(tmp_path / "labels.jsonl")) == 6 and again["problems"] == 6  # resumed, not redone
    metrics = run_train(recipe, tmp_path, log=None, model_tok=(*quick, str(quick_model_dir)))
    assert (tmp_path / "routers" / "routers.safetensors").exists() and len(metrics["loss_curve"]) == 3

    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "rl.cli", "eval", "--model", str(quick_model_dir), "--backend", "hf"]
    cmd += ["--benchmarks", "synthetic", "--limit", "6", "--max-tokens", "40", "--routers", str(tmp_path / "routers")]
    cmd += ["--router-bias", "0,50", "--out", str(out), "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    bench = report["benchmarks"]["synthetic"]
    assert bench["layers"]["num_layers"] == 4 and 0 <= bench["layers_executed_mean"] <= 8
    curve = report["router_curve"]["synthetic"]
    assert [p["skip_bias"] for p in curve] == [None, 0.0, 50.0]
    assert curve[0]["layers_executed_mean"] == 4.0
    assert curve[2]["layers_executed_mean"] == 0.0 and curve[2]["layer_flops_ratio"] < 0.05  # bias 50: skip all
    assert (out / "accuracy_vs_layers.png").exists()


def test_routed_eval_refuses_what_it_cannot_do(quick_model_dir, tmp_path):
    base = [sys.executable, "-m", "rl.cli", "eval", "--model", str(quick_model_dir), "--benchmarks", "synthetic"]
    res = subprocess.run(base + ["--routers", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "no routers.safetensors" in res.stderr  # vllm and hf both route
    res = subprocess.run(
        base + ["--backend", "hf", "--routers", str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 2 and "no routers.safetensors" in res.stderr
    res = subprocess.run(base + ["--backend", "hf", "--router-bias", "1"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "--router-bias needs --routers" in res.stderr


def test_serial_group_branches_share_their_prompts_plan(quick):
    """Branches (prompt + thinking prefix + exit prompt) are routed from the prompt alone."""
    from rollout.backends.hf import HFBackend
    from rollout.routing.routers import LayerRouters, RouterConfig
    from rollout.types import BranchRequest, SamplingConfig

    model, tok = quick
    prompts = [tok("Start at 3. Apply in order: 1: +5")["input_ids"], tok("Start at 9. Work modulo 10.")["input_ids"]]
    for seed in range(20):  # random routers whose decisions depend on the input: the first that tells these apart
        torch.manual_seed(seed)
        routers = LayerRouters(RouterConfig(num_layers=4, hidden_size=model.config.hidden_size))
        with torch.no_grad():
            routers.b2.mul_(0).add_(torch.tensor([0.0, 0.3, 0.0]))
            routers.w2.mul_(20)
        be = HFBackend(model, tok, routers=routers)
        alone = be.generate(prompts, SamplingConfig(max_tokens=2, temperature=0.0))
        if alone[0].plan != alone[1].plan:
            break
    assert alone[0].plan != alone[1].plan  # the routers do tell these prompts apart
    reqs = [BranchRequest(p + [5, 6, 7, 8], [len(p) + 1, len(p) + 4], [9, 10], route_len=len(p)) for p in prompts]
    branches = be.generate_branches(reqs, SamplingConfig(max_tokens=2, temperature=0.0))
    for i in range(2):
        assert [g.plan for g in branches[i]] == [alone[i].plan] * 2


def test_score_plans_through_the_exit_head_agrees_with_full_logits(quick):
    """The label search scores plans by the exit-head read-out of the checked positions; the verdicts
    equal argmax over full [K, T, V] logits, for a mix of passing and failing plans (the checked
    token is the full model's own argmax, so the full plan passes and skipping plans may not)."""
    from rl.data.problems import DataConfig, Problem, encode_prompts
    from rl.data.synthetic_task import forced_exit_completion, router_label_problems
    from rl.routing.label_search import TeacherForcedCase
    from rollout.routing.routed_generation import left_pad
    from rollout.routing.routed_model import RoutedModel

    model, tok = quick
    routed = RoutedModel(model)
    L = routed.num_layers
    plans = torch.tensor([[1] * L] + [[1] * i + [0] + [1] * (L - i - 1) for i in range(L)] + [[2] * L, [0] * L])
    verdicts = []
    for p in router_label_problems(6):
        prompt = encode_prompts(tok, [Problem(p.id, p.problem, p.answer)], DataConfig())[0]
        text = forced_exit_completion(p, p.computation_chars())
        seq = list(prompt) + tok(text, add_special_tokens=False)["input_ids"]
        case = TeacherForcedCase(p.id, seq, len(prompt), [])
        ids, attn = left_pad([case.ids], 0, "cpu")
        with torch.no_grad():  # the last token made the full model's argmax: the full plan passes
            case.ids[-1] = int(routed(ids, attn).logits[0, -2].argmax())
        case.checks = [len(case.ids) - 1]
        got = score_plans(routed, case, plans)
        ids, attn = left_pad([case.ids] * len(plans), 0, "cpu")
        with torch.no_grad():
            logits = routed(ids, attn, plan=plans).logits
        at = torch.tensor(case.checks)
        want = (logits[:, at - 1].argmax(-1) == ids[:, at]).all(-1)
        assert torch.equal(got, want)
        assert bool(got[0])
        verdicts += got.tolist()
    assert any(verdicts) and not all(verdicts)  # both verdicts occur


def test_greedy_cases_pass_exactly_the_plans_that_generate_the_full_models_completion(quick):
    """check=greedy: a plan passes the teacher-forced check iff greedy generation under it writes the
    full model's own completion token for token (the verdict and generation agree by construction)."""
    from rl.data.problems import DataConfig, Problem, encode_prompts
    from rl.data.synthetic_task import router_label_problems
    from rl.routing.label_search import greedy_cases
    from rollout.routing.routed_generation import routed_generate
    from rollout.routing.routed_model import RoutedModel

    model, tok = quick
    routed = RoutedModel(model)
    L = routed.num_layers
    arith = router_label_problems(4)
    prompts = encode_prompts(tok, [Problem(p.id, p.problem, p.answer) for p in arith], DataConfig())
    cases = greedy_cases(routed, tok, arith, prompts, max_tokens=24)
    assert [c.ids[: c.prompt_len] for c in cases] == prompts
    assert all(c.checks == list(range(c.prompt_len, len(c.ids))) and len(c.checks) > 0 for c in cases)
    plans = torch.tensor([[1] * L] + [[1] * i + [0] + [1] * (L - i - 1) for i in range(L)] + [[2] * L, [0] * L])
    kw = dict(max_tokens=24, eos_ids={tok.eos_token_id}, pad_id=tok.pad_token_id)
    verdicts = []
    for case, prompt in zip(cases, prompts):
        got = score_plans(routed, case, plans).tolist()
        rows = routed_generate(routed, [prompt] * len(plans), plans=plans, **kw)
        same = [r.tokens == case.ids[case.prompt_len :] for r in rows]
        assert got == same
        assert got[0]  # the full plan reproduces its own completion
        verdicts += got
    assert len(verdicts) == 4 * (L + 3) and any(verdicts) and not all(verdicts)  # both verdicts occur


def test_routers_decide_from_the_features_they_train_on(quick, tmp_path):
    """The decisions at prefill equal the routers on the training features (``router_features``,
    teacher-forced under the decided plan), and survive save/load."""
    from rollout.routing.routed_generation import left_pad
    from rollout.routing.routed_model import RoutedModel
    from rollout.routing.router_features import router_features
    from rollout.routing.routers import LayerRouters, RouterConfig

    model, tok = quick
    d = model.config.hidden_size
    torch.manual_seed(4)
    routers = LayerRouters(RouterConfig(num_layers=4, hidden_size=d, num_windows=4))
    with torch.no_grad():
        routers.w2.mul_(20)
    routed = RoutedModel(model, routers)
    texts = ("Start at 3. Apply in order: 1: +5", "Start at 9.", "Work modulo 10. 2: *3")
    prompts = [tok(t)["input_ids"] for t in texts]
    ids, attn = left_pad(prompts, 0, "cpu")
    with torch.no_grad():
        out = routed(ids, attn, output_layer_inputs=True)
        means, valid = router_features(RoutedModel(model), prompts, out.plan, 4)
        assert means.shape == (3, 4, 4, d)
        torch.testing.assert_close(routers.all_window_logits(means, valid), out.router_logits, atol=1e-4, rtol=1e-4)
        loaded = LayerRouters.load(routers.save(tmp_path / "r"))
        assert torch.equal(RoutedModel(model, loaded)(ids, attn).plan, out.plan)


def test_routers_saved_with_the_removed_readout_features_are_refused_by_name(tmp_path):
    import json

    from rollout.routing.routers import LayerRouters, RouterConfig

    folder = LayerRouters(RouterConfig(num_layers=2, hidden_size=8)).save(tmp_path / "r")
    cfg = json.loads((folder / "routers.json").read_text())
    (folder / "routers.json").write_text(json.dumps({**cfg, "readout_features": False}))
    assert LayerRouters.load(folder).config.input_size == 8  # the old default still loads
    (folder / "routers.json").write_text(json.dumps({**cfg, "readout_features": True}))
    with pytest.raises(ValueError, match="routers.json: routers trained with readout_features"):
        LayerRouters.load(folder)


def test_static_plan_is_the_best_vocabulary_plan_at_the_routers_depth_and_runs_everywhere(quick):
    from rl.routing.demo_stage import best_static_plan, constant_routers
    from rollout.backends.hf import HFBackend
    from rollout.types import SamplingConfig

    vocab = [
        {"plan": [1, 1, 1, 1], "executed": 4, "pass_rate": 1.0},
        {"plan": [1, 0, 1, 1], "executed": 3, "pass_rate": 0.8},
        {"plan": [1, 1, 0, 1], "executed": 3, "pass_rate": 0.9},
        {"plan": [1, 0, 0, 1], "executed": 2, "pass_rate": 0.9},
        {"plan": [1, 0, 0, 0], "executed": 1, "pass_rate": 0.1},
    ]
    assert best_static_plan(vocab, 3.0)["plan"] == [1, 0, 0, 1]  # ties on pass rate: fewer passes
    assert best_static_plan(vocab, 3.4)["plan"] == [1, 0, 0, 1]
    assert best_static_plan(vocab, 1.0)["plan"] == [1, 0, 0, 0]
    with pytest.raises(ValueError, match="at most 0.5"):
        best_static_plan(vocab, 0.5)
    model, tok = quick
    be = HFBackend(model, tok, routers=constant_routers([2, 0, 1, 0], model.config.hidden_size))
    prompts = [tok(t)["input_ids"] for t in ("Start at 3. Apply in order: 1: +5", "Start at 9.", "1: *7 2: -3")]
    gens = be.generate(prompts, SamplingConfig(max_tokens=2, temperature=0.0))
    assert [g.plan for g in gens] == [[2, 0, 1, 0]] * 3
