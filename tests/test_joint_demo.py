"""The demo's two levels (rl/demo.py, rl/joint_demo.py) end to end at toy size on the quick model:
S-GRPO, the two-stage routers on its policy, the static plan, joint from there, every point evaluated
on the same problems and priced in FLOPs, the claim, the plot."""

import json

import pytest

from rl.joint_demo import compute_share


def test_compute_share_by_hand():
    # 40 thinking tokens at 5 of 8 layers against a baseline thinking 100 tokens at all 8: 0.25
    assert compute_share(40.0, 5.0, 8, 100.0) == 0.25


def test_joint_claim_by_hand():
    from rl.joint_demo import joint_claim

    base, two = {"accuracy": 0.995}, {"accuracy": 0.992, "flops_ratio": 0.30}
    ok = joint_claim({"accuracy": 0.990, "flops_ratio": 0.20, "compute": 0.1}, two, base)
    assert ok["accuracy_points"] == -0.5 and ok["flops_ok"] and ok["vs_two_stage_ok"] and ok["holds"]
    # a layer bought with accuracy: cheaper than two-stage but 0.6 point below it
    bought = joint_claim({"accuracy": 0.986, "flops_ratio": 0.20, "compute": 0.1}, two, base)
    assert bought["accuracy_ok"] and not bought["vs_two_stage_ok"] and not bought["holds"]
    assert not joint_claim({"accuracy": 0.995, "flops_ratio": 0.26, "compute": 0.1}, two, base)["flops_ok"]


ROUTERS_TOY = [
    "problems=6",
    "agreement_sample=2",
    "max_tokens=24",
    "label.budget=2",
    "vocabulary.search_problems=4",
    "vocabulary.vocab_size=4",
    "vocabulary.min_pass_rate=0.0",
    "train.epochs=2",
    "train.batch_size=4",
    "train.router_hidden=16",
    "train.num_windows=2",
]
TRAIN_TOY = [
    "run.steps=1",
    "run.save_every=1",
    "run.eval_every=0",
    "rollout.prompts_per_step=2",
    "rollout.max_tokens=24",
    "rollout.serial.num_exits=1",
    "rollout.serial.answer_max_tokens=4",
]


def test_the_demo_runs_both_levels_on_one_model_and_prices_every_method_in_flops(quick_model_dir, tmp_path):
    """Plain ``run_demo`` at toy size: baseline -> S-GRPO -> routers on the S-GRPO policy (two-stage,
    static plan) -> joint from there, every method point on the same problems with its FLOPs ratio
    against the unrouted baseline; the joint run starts from the S-GRPO checkpoint and the routers."""
    from rl.demo import DemoConfig, run_demo
    from rl.models.tiny_reasoner import TinyModelRecipe

    recipe = TinyModelRecipe(sft_steps=60, train_problems=2000, batch_size=16, restart_steps=0)
    cfg = DemoConfig(
        out=str(tmp_path / "demo"),
        n_eval=4,
        n_eval_routers=4,
        recipe=recipe,
        overrides=TRAIN_TOY,
        routers_overrides=ROUTERS_TOY,
        joint_overrides=[*TRAIN_TOY, "layers.variants=2", "layers.answer_max_tokens=3"],
    )
    s = run_demo(cfg)
    saved = json.loads((tmp_path / "demo" / "summary.json").read_text())
    need = {"baseline", "sgrpo", "routers", "static_plan", "two_stage", "joint", "deep_baseline", "deep_sgrpo"}
    assert need <= set(saved) and "joint_claim" in saved and saved["wall_s_after_build"] > 0
    assert saved["model"] == str(quick_model_dir)  # one model for both levels
    base = s["baseline"]
    for key in ("sgrpo", "static_plan", "two_stage", "joint", "deep_baseline"):
        p = saved[key]
        assert p["flops_ratio"] == s[key]["flops_per_problem"] / base["flops_per_problem"], key
        assert "item_accuracy" not in p  # the verdicts go to heldout_items.json
    items = json.loads((tmp_path / "demo" / "heldout_items.json").read_text())
    assert sorted(items["joint"]["item_accuracy"]) == sorted(base["item_accuracy"])
    assert saved["deep_baseline"]["flops_ratio"] == 1.0 and saved["deep_baseline"]["paired_vs_baseline"]["points"] == 0
    # two-stage: the routers stage on the S-GRPO checkpoint, its time the policy's and the routers'
    sgrpo_model = s["sgrpo"]["model"]
    assert (
        saved["routers"]["model"] == sgrpo_model and saved["routers"]["baseline"]["accuracy"] == s["sgrpo"]["accuracy"]
    )
    assert saved["two_stage"]["accuracy"] == saved["routers"]["accuracy"]
    assert saved["two_stage"]["train_wall_s"] == round(s["sgrpo"]["wall_s"] + saved["routers"]["train_wall_s"], 1)
    # joint: started from that checkpoint and those routers, its time counting both
    joint_cfg = json.loads((tmp_path / "demo" / "layers" / "joint" / "config.json").read_text())
    assert joint_cfg["model"]["path"] == sgrpo_model
    assert joint_cfg["layers"]["init_routers"] == str(tmp_path / "demo" / "routers" / "routers")
    assert saved["joint"]["train_wall_s"] > saved["two_stage"]["train_wall_s"]
    ckpt = tmp_path / "demo" / "layers" / "joint" / "checkpoints" / "step-000001" / "model" / "routers.safetensors"
    assert ckpt.exists()
    # the static plan: one plan of the vocabulary for every input, evaluated through the routers' path
    st = saved["static_plan"]
    voc = [p["plan"] for p in saved["routers"]["label_stats"]["vocabulary"]["plans"]]
    assert st["plan"] in voc and st["layers_executed_mean"] == sum(st["plan"])
    fits = st["layers_executed_mean"] <= saved["routers"]["layers_executed_mean"] + 1e-9
    assert st["within_routers_depth"] == fits
    c = saved["joint_claim"]
    assert c["flops_ratio"] == round(saved["joint"]["flops_ratio"], 4)
    assert c["holds"] == (c["flops_ok"] and c["accuracy_ok"] and c["vs_two_stage_ok"])
    assert (tmp_path / "demo" / "layers" / "joint.png").stat().st_size > 0
    assert st["flops_ratio"] == s["static_plan"]["flops_per_problem"] / base["flops_per_problem"]
    assert st["flops_ratio_vs_policy"] == st["flops_per_problem"] / s["sgrpo"]["flops_per_problem"]


def test_seeds_table_reports_the_layer_points_and_the_joint_claim_per_seed():
    from rl.demo_seeds import seeds_table

    def seed(acc, flops, holds):
        joint = {"accuracy": acc, "flops_ratio": flops, "layers_executed_mean": 4.0, "accuracy_points": 0.0}
        return {"model_weights_sha256": "x", "baseline": {"accuracy": 1.0, "think_tokens": 100.0}, "joint": joint,
                "joint_claim": {"holds": holds}}  # fmt: skip

    t = seeds_table({0: seed(0.99, 0.30, False), 1: seed(0.97, 0.20, True), 2: seed(0.98, 0.25, True)})
    assert t["joint"]["flops_ratio"]["min"] == 0.20 and t["joint"]["flops_ratio"]["max"] == 0.30
    assert abs(t["joint"]["accuracy"]["mean"] - 0.98) < 1e-12 and "think_tokens" not in t["joint"]
    assert t["baseline"]["think_tokens"]["mean"] == 100.0 and t["joint_claim_holds"] == "2/3"


def test_layer_levels_on_their_own_problem_count_evaluate_the_policy_once(monkeypatch, tmp_path):
    """``n_eval_routers`` != the baseline's ``n``: the baseline and the S-GRPO policy are evaluated on
    the layer level's problems once each, and the routers stage gets that whole evaluation (its ``n``
    matching), so it does not evaluate the policy again."""
    import rl.joint_demo as jd
    import rl.routing.demo_stage as ds

    evaluated = []

    def fake_eval(backend, n):
        evaluated.append((backend, n))
        return {"n": n, "accuracy": 0.5, "by_difficulty": {}, "item_accuracy": {}}

    class Stop(Exception):
        pass

    def fake_routers_stage(out, recipe, seed, n_eval, model_dir, base):
        assert base.get("n") == n_eval  # routers_stage re-evaluates only when the counts differ
        raise Stop(model_dir, base)

    monkeypatch.setattr(jd, "evaluate_heldout", fake_eval)
    monkeypatch.setattr(jd, "make_backend", lambda kind, path, **kw: path)
    monkeypatch.setattr(ds, "routers_stage", fake_routers_stage)
    summary = {
        "model": "base-model",
        "baseline": {"n": 4, "num_layers": 8},
        "sgrpo": {"model": "policy-ckpt", "wall_s": 12.0, "n": 4},
    }
    with pytest.raises(Stop) as stop:
        jd.layer_levels(tmp_path, summary, 0, 6)
    model_dir, policy = stop.value.args
    assert evaluated == [("base-model", 6), ("policy-ckpt", 6)]
    assert model_dir == "policy-ckpt" and policy["train_wall_s"] == 12.0 and "by_difficulty" in policy
