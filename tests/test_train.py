"""The learner and the training loop on the quick tiny model: packing, fused vs full-logits
log-probs, a short S-GRPO run with its metrics, guards, and a SIGKILL mid-run that resumes to the
same weights as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rl.trainer.config import TrainConfig
from rl.trainer.config_loading import load_config
from rl.trainer.core_algos import aggregation_weights, kl_k3, masked_aggregate, truncated_is_weights
from rl.trainer.learner import (
    PolicyLogprobs,
    PolicyTokenLoss,
    build_learner_batch,
    collate,
    pack_micro_batches,
    scatter_tokens,
)
from rollout.types import ANSWER, EXIT_PROMPT, THINK, RolloutSequence
from tests.reference_losses import ppo_clip_loss

ROOT = Path(__file__).resolve().parents[1]


def test_pack_micro_batches_respects_the_token_budget():
    lengths = [10, 50, 20, 40, 30, 100]
    packs = pack_micro_batches(lengths, 80)
    assert sorted(i for p in packs for i in p) == list(range(6))
    for p in packs:
        assert len(p) == 1 or max(lengths[i] for i in p) * len(p) <= 80
    assert packs == [[0, 2], [4, 3], [1], [5]]  # by length: 10,20 (3x30 > 80) | 30,40 (2x40) | 50 | 100 alone


def _seq(gid, prompt, comp, regions, full):
    return RolloutSequence(gid, prompt, comp, regions, [-0.5] * len(comp), len(comp), full, "stop")


def test_fused_policy_logprobs_equal_full_logits(quick_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(quick_model_dir, dtype=torch.float32)
    seqs = [
        _seq(0, [1, 5, 9], [20, 21, 22, 23], [THINK, EXIT_PROMPT, ANSWER, ANSWER], False),
        _seq(0, [1, 5], [30, 31], [THINK, ANSWER], True),
    ]
    lb = build_learner_batch(seqs, [0.5, -0.5])
    t = collate(lb, 0, "cpu")
    assert t["loss_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 0, 0]]
    assert t["sampled"].tolist() == [[1, 0, 1, 1], [1, 1, 0, 0]]
    shape = tuple(t["completion_mask"].shape)
    fused = PolicyLogprobs(model, fused=True)
    naive = PolicyLogprobs(model, fused=False)
    lf, ef = fused(t["input_ids"], t["attention_mask"], t["positions"], t["targets"], 0.7)
    ln, en = naive(t["input_ids"], t["attention_mask"], t["positions"], t["targets"], 0.7)
    assert torch.allclose(lf, ln, atol=1e-5) and torch.allclose(ef, en, atol=1e-4)
    # and against a hand gather from the model's own logits for sequence 0
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 9, 20, 21, 22, 23]])).logits[0] / 0.7
    want = torch.log_softmax(logits, -1)[[2, 3, 4, 5], [20, 21, 22, 23]]
    assert torch.allclose(scatter_tokens(lf.detach(), t["slots"], shape)[0], want, atol=1e-5)
    # gradients agree too
    (lf * torch.arange(len(lf))).sum().backward()
    g_fused = model.model.layers[0].mlp.up_proj.weight.grad.clone()
    model.zero_grad()
    ln2, _ = naive(t["input_ids"], t["attention_mask"], t["positions"], t["targets"], 0.7)
    (ln2 * torch.arange(len(ln2))).sum().backward()
    assert torch.allclose(g_fused, model.model.layers[0].mlp.up_proj.weight.grad, atol=1e-5)


def test_policy_logprobs_under_layer_plans_equal_the_routed_model(quick_model_dir):
    """Joint training's policy loss runs each variant under its layer plan: the learner's log-probs
    of a row with a plan equal the routed model's own logits under it (fused and full-logits
    paths), a row without one is the plain model's, and the skipped layer gets no gradient."""
    from transformers import AutoModelForCausalLM

    from rollout.routing.routed_model import RoutedModel

    model = AutoModelForCausalLM.from_pretrained(quick_model_dir, dtype=torch.float32)
    L = model.config.num_hidden_layers
    plan = [1, 0] + [1] * (L - 2)
    seqs = [
        _seq(0, [1, 5, 9], [20, 21, 22, 23], [THINK, EXIT_PROMPT, ANSWER, ANSWER], False),
        _seq(0, [1, 5], [30, 31], [THINK, ANSWER], True),
    ]
    plain = build_learner_batch(seqs[1:], [-0.5])
    routed_lb = build_learner_batch(seqs[:1], [0.5])
    routed_lb.plans = [plan]
    lb = routed_lb + plain
    assert lb.plans == [plan, None] and len(lb) == 2 and lb.advantages == [0.5, -0.5]
    t = collate(lb, 0, "cpu")
    assert t["plans"].tolist() == [plan, [1] * L]
    shape = tuple(t["completion_mask"].shape)
    args = (t["input_ids"], t["attention_mask"], t["positions"], t["targets"], 0.7)
    with torch.no_grad():
        want0 = (
            RoutedModel(model)(
                torch.tensor([[1, 5, 9, 20, 21, 22, 23]]), torch.ones(1, 7, dtype=torch.long), plan=torch.tensor([plan])
            ).logits[0]
            / 0.7
        )
        want1 = model(input_ids=torch.tensor([[1, 5, 30, 31]])).logits[0] / 0.7
        full0 = model(input_ids=torch.tensor([[1, 5, 9, 20, 21, 22, 23]])).logits[0] / 0.7
    w0 = torch.log_softmax(want0, -1)[[2, 3, 4, 5], [20, 21, 22, 23]]
    w1 = torch.log_softmax(want1, -1)[[1, 2], [30, 31]]
    assert not torch.allclose(w0, torch.log_softmax(full0, -1)[[2, 3, 4, 5], [20, 21, 22, 23]], atol=1e-3)
    for fused in (True, False):
        lp, _ = PolicyLogprobs(model, fused=fused)(*args, plans=t["plans"])
        got = scatter_tokens(lp.detach(), t["slots"], shape)
        torch.testing.assert_close(got[0], w0, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1, :2], w1, atol=1e-5, rtol=1e-5)
    model.zero_grad()
    only = collate(routed_lb, 0, "cpu")
    lp, _ = PolicyLogprobs(model)(
        only["input_ids"], only["attention_mask"], only["positions"], only["targets"], 0.7, plans=only["plans"]
    )
    lp.sum().backward()
    assert model.model.layers[1].mlp.up_proj.weight.grad is None  # skipped by the plan
    assert float(model.model.layers[2].mlp.up_proj.weight.grad.abs().max()) > 0


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_fused_policy_loss_equals_the_batch_loss(quick_model_dir, agg):
    """The learner's per-token loss through kernels.fused_policy_loss equals ppo_clip_loss + KL on the
    [B, T] layout of the full-logits path (old log-probs, truncated IS and a reference), in value and
    in the gradient of every parameter, scaled by the micro-batch share."""
    from transformers import AutoModelForCausalLM

    from rl.trainer.update import _token_order

    model = AutoModelForCausalLM.from_pretrained(quick_model_dir, dtype=torch.float32)
    seqs = [
        _seq(0, [1, 5, 9], [20, 21, 22, 23], [THINK, EXIT_PROMPT, ANSWER, ANSWER], False),
        _seq(0, [1, 5], [30, 31, 32], [THINK, THINK, ANSWER], True),
    ]
    lb = build_learner_batch(seqs, [0.7, -0.4], masks=[[1] * len(s.regions) for s in seqs])  # every token
    t = collate(lb, 0, "cpu")
    shape = tuple(t["completion_mask"].shape)
    g = torch.Generator().manual_seed(3)
    old = torch.randn(shape, generator=g) * 0.2 - 6.0  # far from the model: some ratios clip
    ref = torch.randn(shape, generator=g) * 0.2 - 6.0
    sampled = t["sampled"] * t["completion_mask"]
    flat = _token_order(t["slots"])
    tl = PolicyTokenLoss(
        weight=flat(aggregation_weights(t["loss_mask"], agg)),
        advantages=t["advantages"][t["slots"] // shape[1]],
        clip_low=0.2,
        clip_high=0.28,
        old_logp=flat(old),
        sampler_logp=flat(old) + 0.1,
        sampled=flat(sampled),
        tis_cap=1.5,
        ref_logp=flat(ref),
        kl_coef=0.05,
    )
    grads = {}
    for fused in (True, False):
        model.zero_grad()
        loss, lp, _ = PolicyLogprobs(model, fused=fused)(
            t["input_ids"], t["attention_mask"], t["positions"], t["targets"], 0.8, token_loss=tl
        )
        (loss * 0.6).backward()
        grads[fused] = (
            float(loss.detach()),
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        )
    # the same loss written on the [B, T] layout with the batch functions
    lp_bt, _ = PolicyLogprobs(model, fused=False)(
        t["input_ids"], t["attention_mask"], t["positions"], t["targets"], 0.8
    )
    logp = scatter_tokens(lp_bt, t["slots"], shape)
    w, _ = truncated_is_weights(old, old + 0.1, sampled, 1.5)
    want, _ = ppo_clip_loss(logp, old, t["advantages"], t["loss_mask"], 0.2, 0.28, agg, w)
    want = want + 0.05 * masked_aggregate(kl_k3(logp, ref), t["loss_mask"], agg)
    assert grads[True][0] == pytest.approx(float(want), abs=1e-6)
    assert grads[False][0] == pytest.approx(float(want), abs=1e-6)
    assert set(grads[True][1]) == set(grads[False][1]) and "model.embed_tokens.weight" in grads[True][1]
    for name, gf in grads[True][1].items():
        torch.testing.assert_close(gf, grads[False][1][name], atol=2e-6, rtol=1e-4, msg=name)


def _cfg(model_dir, out, *extra):
    return load_config(
        TrainConfig,
        ROOT / "configs" / "tiny_sgrpo.yaml",
        [
            f"model.path={model_dir}",
            f"run.out_dir={out}",
            "run.steps=3",
            "run.save_every=1",
            "run.eval_every=0",
            "rollout.prompts_per_step=4",
            "rollout.max_tokens=48",
            "rollout.serial.num_exits=2",
            "rollout.serial.answer_max_tokens=8",
            "optim.lr=1e-3",
            "optim.warmup_steps=0",
            *extra,
        ],
    )


def _alternating_rewards(monkeypatch):
    """The quick model rarely answers right; give every group a signal (members alternately
    correct) so the learner always has work."""
    import rl.trainer.step as step_mod

    real = step_mod.step_rewards

    def fake(seqs, members, problems, tok, cfg, verifier):
        real(seqs, members, problems, tok, cfg, verifier)  # still exercise decoding + verification
        correct = [i % 2 == 0 for i in range(len(seqs))]
        from rewards.reward_functions import decaying_rewards

        rewards = [0.0] * len(seqs)
        for idx in members:
            for i, r in zip(idx, decaying_rewards([correct[i] for i in idx])):
                rewards[i] = r
        return correct, rewards

    monkeypatch.setattr(step_mod, "step_rewards", fake)


def test_short_sgrpo_run_logs_metrics_and_checkpoints(quick_model_dir, tmp_path, monkeypatch):
    from rl.trainer.loop import train

    _alternating_rewards(monkeypatch)
    summary = train(_cfg(quick_model_dir, tmp_path, "optim.epochs=2"))
    assert summary["steps"] == 3
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in (
        "reward/mean",
        "rollout/accuracy",
        "rollout/think_tokens",
        "groups/zero_advantage",
        "time/rollout_s",
        "time/reward_s",
        "time/learn_s",
        "time/sync_s",
        "perf/rollout_tokens_per_s",
    ):
        assert key in rows[-1], key
    assert rows[-1]["groups/sequences"] <= 4 * 3
    learned = [r for r in rows if "learn/clip_frac" in r]
    assert learned
    assert any(r["learn/clip_frac"] > 0 for r in learned)  # epochs=2: the second pass moves off-policy
    for r in learned:
        assert 0.0 <= r["learn/clip_frac"] <= 1.0 and r["learn/is_raw_min"] > 0
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["step-000002", "step-000003"]  # keep_last = 2
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 3


def test_nonfinite_losses_stop_the_run_with_a_clear_message(quick_model_dir, tmp_path, monkeypatch):
    import rl.trainer.learner as learner_mod
    import rl.trainer.loop as train_mod

    def nan_loss(logp, *a, **k):  # NaN through the fused kernel's per-token loss and its gradients
        return logp * float("nan")

    _alternating_rewards(monkeypatch)
    monkeypatch.setattr(learner_mod, "ppo_clip_token_loss", nan_loss)
    cfg = _cfg(quick_model_dir, tmp_path, "run.max_nonfinite=2", "run.steps=6", "rollout.temperature=1.5")
    with pytest.raises(train_mod.TrainingStopped, match="non-finite"):
        train_mod.train(cfg)


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model" / "model.safetensors"))


@pytest.mark.parametrize("joint", [False, True], ids=["policy", "joint"])
def test_sigkill_mid_run_resumes_to_identical_weights(quick_model_dir, tmp_path, joint):
    """A run killed mid-way and resumed ends with the same weights as one straight run; with joint
    training (``layers.enabled``) the routers too."""
    joint_args = [
        *("layers.enabled=true", "layers.variants=4", "layers.router_lr=0.01", "layers.answer_max_tokens=12"),
        # the dual variables move every step (an entropy floor above any entropy: its coefficient grows)
        *("layers.reward=accuracy_constrained", "layers.min_entropy=2.0"),
        "run.keep_last=4",  # every checkpoint kept: the routers of step 1 are compared below
    ]
    args = [
        *(joint_args if joint else []),
        f"model.path={quick_model_dir}",
        "run.steps=4",
        "run.save_every=1",
        "run.eval_every=0",
        "run.tensorboard=false",
        "rollout.prompts_per_step=4",
        "rollout.max_tokens=48",
        "rollout.serial.num_exits=2",
        "rollout.serial.answer_max_tokens=12",
        "optim.lr=1e-3",
        "optim.warmup_steps=1",
        "optim.schedule=cosine",
        "loss.format_penalty=0.5",
    ]  # a format signal: the quick model is rarely right
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    cmd = [sys.executable, "-m", "rl.train", str(ROOT / "configs" / "tiny_sgrpo.yaml")]
    straight = tmp_path / "straight"
    subprocess.run(cmd + args + [f"run.out_dir={straight}"], check=True, cwd=ROOT, env=env, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        cmd + args + [f"run.out_dir={killed}"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 600
    while not (killed / "checkpoints" / "step-000002").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in (killed / "checkpoints").iterdir() if not p.name.endswith(".tmp"))
    assert "step-000004" not in done  # really interrupted
    subprocess.run(cmd + args + [f"run.out_dir={killed}"], check=True, cwd=ROOT, env=env, capture_output=True)

    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert any("learn/grad_norm" in r for r in rows)  # the run really learned something
    a = _weights(straight / "checkpoints" / "step-000004")
    b = _weights(killed / "checkpoints" / "step-000004")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], _weights_base(quick_model_dir)[k]) for k in a)  # training did change them
    if joint:
        from safetensors.torch import load_file

        ra, rb, r1 = (
            load_file(str(d / "checkpoints" / step / "model" / "routers.safetensors"))
            for d, step in ((straight, "step-000004"), (killed, "step-000004"), (straight, "step-000001"))
        )
        assert all(torch.equal(ra[k], rb[k]) for k in ra)
        # the routers move only in steps whose layer variants scored apart (policy sequences > 0);
        # one of steps 2-4 did, so the routers the resumed run ends with are trained ones it restored
        moved = [r["step"] for r in rows if r.get("layers/policy_sequences", 0) > 0 and r["step"] > 1]
        assert moved
        assert not all(torch.equal(ra[k], r1[k]) for k in ra)
        # the dual variables come back with the checkpoint: the resumed run's step 4 has the straight one's
        last = {k: rows[-1][k] for k in ("layers/multiplier", "layers/entropy_coef")}
        resumed = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()][-1]
        assert {k: resumed[k] for k in last} == last
        assert last["layers/entropy_coef"] > 0.01 + 3 * 0.05  # grew from 0.01 by at least 0.05 per step


def _weights_base(model_dir):
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


def test_lora_run_trains_only_the_adapter_and_resumes(quick_model_dir, tmp_path, monkeypatch):
    from peft import PeftModel

    from rl.trainer.loop import train
    from rl.trainer.setup import load_policy

    _alternating_rewards(monkeypatch)
    cfg = _cfg(quick_model_dir, tmp_path, "lora.enabled=true", "lora.r=4", "run.steps=2")
    train(cfg)
    ckpt = tmp_path / "checkpoints" / "step-000002"
    assert (ckpt / "model" / "adapter_model.safetensors").exists()
    model, _, _ = load_policy(cfg, ckpt)
    assert isinstance(model, PeftModel)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # fused log-probs through the PEFT-wrapped model equal the full-logits path
    t = collate(
        build_learner_batch([_seq(0, [1, 5, 9], [20, 21, 22], [THINK, ANSWER, ANSWER], True)], [1.0]),
        0,
        "cpu",
    )
    lf, _ = PolicyLogprobs(model, fused=True)(t["input_ids"], t["attention_mask"], t["positions"], t["targets"])
    ln, _ = PolicyLogprobs(model, fused=False)(t["input_ids"], t["attention_mask"], t["positions"], t["targets"])
    assert torch.allclose(lf, ln, atol=1e-5)


def test_held_out_evaluation_on_a_dataset_from_the_recipe(quick_model_dir, tmp_path, shared_dir):
    """run.eval_data can name any dataset (here a local JSONL with the recipe's column keys): it is
    evaluated greedily through the same path as exitrl eval, at step 0 and every eval_every steps."""
    from rl.trainer.loop import train

    smoke = shared_dir / "benchmarks" / "smoke.jsonl"
    cfg = _cfg(
        quick_model_dir,
        tmp_path,
        "run.steps=1",
        "run.eval_every=1",
        "run.eval_problems=3",
        f"run.eval_data.source={smoke}",
        "rollout.prompts_per_step=2",
    )
    summary = train(cfg)
    hist = summary["eval_history"]
    assert [h["step"] for h in hist] == [0, 1]
    for h in hist:
        assert h["accuracy"] in (0.0, 1 / 3, 2 / 3, 1.0) and 0 < h["think_tokens"] <= 48
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["eval/accuracy"] == hist[-1]["accuracy"]


def test_bf16_recipe_keeps_fp32_master_weights(quick_model_dir, tmp_path):
    """model.dtype=bfloat16: parameters and AdamW state stay fp32 (the learner runs under bf16
    autocast), so lr-1e-6 updates land; on bf16 parameters most of them round away."""
    from rl.trainer.loop import build_trainer
    from rl.trainer.update import learn

    cfg = _cfg(quick_model_dir, tmp_path, "model.dtype=bfloat16", "optim.lr=1e-6", "optim.grad_clip=0")
    t = build_trainer(cfg, None)
    try:
        assert t.update.accelerator.mixed_precision == "bf16"
        assert {p.dtype for p in t.raw_model.parameters()} == {torch.float32}
        seqs = [
            _seq(0, [1, 5, 9], [20, 21, 22, 23], [THINK, THINK, ANSWER, ANSWER], True),
            _seq(0, [1, 5], [30, 31, 32], [THINK, THINK, ANSWER], True),
        ]
        lb = build_learner_batch(seqs, [1.0, -1.0], masks=[[1] * len(s.regions) for s in seqs])
        start = {n: p.detach().clone() for n, p in t.raw_model.named_parameters()}
        for _ in range(10):
            assert "learn/grad_norm" in learn(t.update, lb)
        moved = sum(int((p.detach() != start[n]).sum()) for n, p in t.raw_model.named_parameters())
        total = sum(p.numel() for p in t.raw_model.parameters())
        assert moved / total > 0.9
        # the same ten AdamW steps on bf16 parameters: updates of ~1e-6 vanish below bf16's resolution
        bf16 = {n: v.to(torch.bfloat16).requires_grad_() for n, v in start.items()}
        opt = torch.optim.AdamW(bf16.values(), lr=1e-6, weight_decay=0.0)
        for _ in range(10):
            for v in bf16.values():
                v.grad = torch.randn_like(v)
            opt.step()
        moved_bf16 = sum(int((v.detach() != start[n].to(torch.bfloat16)).sum()) for n, v in bf16.items())
        assert moved_bf16 / total < 0.2
    finally:
        t.verifier.close()


def _cheap_layer_rewards(monkeypatch):
    """Variants earn 1 - executed / L whatever they answer (the quick model is rarely right): a
    signal that favours skipping, so the routers have something to learn."""
    import rl.trainer.layer_stage as layer_mod

    def fake(correct, executed, cfg, *_):  # the last variant runs all L layers
        return 1.0 - executed.float() / executed[:, -1:].float()

    monkeypatch.setattr(layer_mod, "layer_group_rewards", fake)


def test_joint_run_trains_routers_in_the_policy_optimizer_and_checkpoints_them(quick_model_dir, tmp_path, monkeypatch):
    from rl.trainer.loop import train
    from rollout.routing.routers import LayerRouters

    _alternating_rewards(monkeypatch)
    _cheap_layer_rewards(monkeypatch)
    cfg = _cfg(
        quick_model_dir,
        tmp_path,
        "run.steps=4",
        "layers.enabled=true",
        "layers.variants=4",
        "layers.router_lr=0.05",
        "layers.entropy_coef=0.0",
        "layers.answer_max_tokens=4",
    )
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for key in ("layers/executed_mean", "layers/router_entropy", "reward/layer_mean", "compute/layer_tokens"):
        assert all(key in r for r in rows), key
    assert all(r["compute/layer_tokens"] != r["compute/tokens"] for r in rows)  # variants run fewer/more layers
    assert all(r["layers/policy_sequences"] > 0 for r in rows)  # their answers join the policy update
    # the reward pays for skipping: the routers' sampled plans get cheaper
    assert rows[-1]["layers/sampled_executed_mean"] <= rows[0]["layers/sampled_executed_mean"] - 1  # 3.8 -> 1.2
    ck = tmp_path / "checkpoints" / "step-000004" / "model"
    assert not [k for k in _weights(ck.parent) if "rout" in k]  # model.safetensors stays a plain model
    saved = LayerRouters.load(ck)
    fresh = LayerRouters.load(tmp_path / "checkpoints" / "step-000003" / "model")
    assert not torch.equal(saved.w1, fresh.w1)  # the routers moved between steps
    # resume: one more step from step 4 continues from the saved routers and optimizer state
    train(
        _cfg(
            quick_model_dir,
            tmp_path,
            "run.steps=5",
            "layers.enabled=true",
            "layers.variants=4",
            "layers.router_lr=0.05",
            "layers.entropy_coef=0.0",
            "layers.answer_max_tokens=4",
        )
    )
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]


def test_fresh_joint_routers_start_near_the_full_model_with_an_execute_prior(quick_model_dir, tmp_path):
    """``layers.init_execute_bias`` shifts every fresh router's execute logit: with 2.0 the routers'
    greedy plans on real prompts are all-execute and a sampled action is execute about 0.8 of the time;
    without it the fresh routers' argmax skips or repeats layers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rl.trainer.setup import attach_routers
    from rollout.routing.routed_generation import left_pad
    from rollout.routing.routed_model import RoutedModel
    from rollout.routing.routers import EXECUTE

    tok = AutoTokenizer.from_pretrained(quick_model_dir)
    prompts = [tok(f"What is {i} + {2 * i}?")["input_ids"] for i in range(16)]
    shares = {}
    for bias in (0.0, 2.0):
        model = AutoModelForCausalLM.from_pretrained(quick_model_dir)
        torch.manual_seed(0)
        cfg = _cfg(quick_model_dir, tmp_path, "layers.enabled=true", f"layers.init_execute_bias={bias}")
        routers = attach_routers(cfg, model, None)
        routed = RoutedModel(model, routers, mode="grouped")
        with torch.no_grad():
            ids, attn = left_pad(prompts, tok.pad_token_id or 0, routed.device)
            greedy = routed.decide_plans(ids, attn)
            z = routed(ids, attn, temperature=1.0, logits_to_keep=1, lm_head=False).router_logits  # [B, L, 3]
        shares[bias] = (float((greedy == EXECUTE).float().mean()), float(torch.softmax(z, -1)[..., EXECUTE].mean()))
    assert shares[2.0][0] == 1.0
    assert 0.7 < shares[2.0][1] < 0.9
    assert shares[0.0][0] < 1.0 and shares[0.0][1] < 0.5
