"""The demo's two-level stage (rl/joint_demo.py) end to end at toy size on the quick model: both
trainings, the two-stage routers, every point evaluated on the same problems, the claim, the plot."""

import json

import torch

from rl.joint_demo import compute_share, heldout_point, joint_stage
from rl.routing.pipeline import RoutersRecipe
from rl.trainer.config_loading import load_config


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


def test_joint_stage_writes_joint_and_two_stage_on_the_same_problems(quick_model_dir, tmp_path):
    from rl.joint_demo import ROUTERS_RECIPE
    from rollout.routing.routers import LayerRouters, RouterConfig

    cfg = json.loads((quick_model_dir / "config.json").read_text())
    torch.manual_seed(0)
    routers = LayerRouters(RouterConfig(cfg["num_hidden_layers"], cfg["hidden_size"], router_hidden=16, num_windows=2))
    rdir = routers.save(tmp_path / "routers")
    base = heldout_point(quick_model_dir, None, 4, 1.0)
    base_think = base["think_tokens"]
    routed = heldout_point(quick_model_dir, rdir, 4, base_think)
    layer_stage = {**routed, "baseline": {**base, "compute": 1.0}}
    assert base["flops_ratio"] == 1.0 and routed["flops_per_problem"] > 0
    recipe = load_config(
        RoutersRecipe,
        ROUTERS_RECIPE,
        [
            "problems=6",
            "agreement_sample=2",
            "max_tokens=24",
            "label.budget=2",
            "vocabulary.search_problems=4",
            "vocabulary.vocab_size=4",
            "train.epochs=2",
            "train.batch_size=4",
            "train.router_hidden=16",
            "train.num_windows=2",
        ],
    )
    extra = [
        "run.steps=1",
        "run.save_every=1",
        "rollout.prompts_per_step=2",
        "rollout.max_tokens=24",
        "rollout.serial.num_exits=1",
        "rollout.serial.answer_max_tokens=4",
        "layers.variants=2",
        "layers.answer_max_tokens=3",
    ]
    out = joint_stage(tmp_path / "layers", str(quick_model_dir), rdir, layer_stage, 0, 4, extra, recipe)
    for key in ("joint", "two_stage", "deep_sgrpo"):
        p = out[key]
        assert p["num_layers"] == cfg["num_hidden_layers"] and p["train_wall_s"] > 0
        assert abs(p["compute"] - p["think_tokens"] * p["layers_executed_mean"] / p["num_layers"] / base_think) < 1e-9
        assert p["flops_ratio"] == p["flops_per_problem"] / base["flops_per_problem"]
    assert out["deep_sgrpo"]["layers_executed_mean"] == cfg["num_hidden_layers"]  # unrouted
    assert (tmp_path / "layers" / "two_stage" / "routers" / "routers" / "routers.safetensors").exists()
    assert (tmp_path / "layers" / "joint" / "checkpoints" / "step-000001" / "model" / "routers.safetensors").exists()
    c = out["joint_claim"]
    assert c["compute"] == round(out["joint"]["compute"], 4)
    assert c["flops_ratio"] == round(out["joint"]["flops_ratio"], 4)
    assert c["holds"] == (c["flops_ok"] and c["accuracy_ok"] and c["vs_two_stage_ok"])
    assert (tmp_path / "layers" / "joint.png").stat().st_size > 0
    saved = json.loads((tmp_path / "layers" / "joint_summary.json").read_text())
    assert set(saved) >= {"joint", "two_stage", "deep_sgrpo", "routers_only", "deep_baseline", "joint_claim"}
