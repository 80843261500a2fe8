"""The routed model inside vLLM (rollout/routing/vllm_model.py) against the transformers routed
model: mixed-plan batches, plans decided in the engine, prefix caching across plans, preemption
with recomputation, and requests aborted mid-generation.

One routed engine for the module, with a KV cache small enough (24 blocks of 32 tokens) that a
batch of eight requests is preempted and recomputed."""

import dataclasses
import json
import re

import httpx
import pytest
import torch

vllm = pytest.importorskip("vllm")

from rl.data.prompts import build_prompt  # noqa: E402
from rl.data.synthetic_task import heldout_problems  # noqa: E402
from rollout.routing.routed_generation import routed_generate  # noqa: E402
from rollout.routing.routed_model import RoutedModel  # noqa: E402
from rollout.routing.routers import LayerRouters, RouterConfig  # noqa: E402
from rollout.types import SamplingConfig  # noqa: E402

TOKENS = 48
BLOCKS = 24


@pytest.fixture(scope="module")
def prompts(quick_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(quick_model_dir)
    return [tok(build_prompt(tok, p.problem), add_special_tokens=False)["input_ids"] for p in heldout_problems(8)]


@pytest.fixture(scope="module")
def routed_export(quick_model_dir, prompts, tmp_path_factory):
    """The quick model exported with random routers, layer 0's calibrated so that it skips on half
    of the test prompts and executes on the other half (plans differ between prompts)."""
    from transformers import AutoModelForCausalLM

    from rl.serving.export import export

    config = json.loads((quick_model_dir / "config.json").read_text())
    torch.manual_seed(3)
    routers = LayerRouters(RouterConfig(num_layers=config["num_hidden_layers"], hidden_size=config["hidden_size"]))
    emb = AutoModelForCausalLM.from_pretrained(quick_model_dir).get_input_embeddings()
    with torch.no_grad():
        routers.w2.mul_(40.0)  # sharp: small differences between prompts flip decisions
        margins = []
        for p in prompts:
            z = routers.layer_logits(0, emb(torch.tensor([p])), torch.ones(1, len(p), dtype=torch.long))[0]
            margins.append(float(z[0] - z[1]))  # skip - execute
        m = sorted(margins)
        routers.b2[0, 0] -= (m[3] + m[4]) / 2
        routers.b2[0, 2] -= 1e4  # layer 0: skip or execute only
    rdir = routers.save(tmp_path_factory.mktemp("routers"))
    return export(quick_model_dir, tmp_path_factory.mktemp("export") / "routed", dtype="float32", routers=rdir)


@pytest.fixture(scope="module")
def engine(routed_export):
    from rollout.backends.vllm import VLLMBackend

    be = VLLMBackend.from_pretrained(
        str(routed_export), dtype="float32", seed=0, max_model_len=512, num_gpu_blocks_override=BLOCKS
    )
    yield be
    del be


@pytest.fixture(scope="module")
def hf(routed_export):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(routed_export, dtype=torch.float32).eval()
    return RoutedModel(m, LayerRouters.load(routed_export))


def _hf_rows(hf, prompts, plans=None):
    """The transformers routed model's greedy rows (tokens, log-probs, plan)."""
    return routed_generate(
        hf,
        prompts,
        max_tokens=TOKENS,
        eos_ids={hf.model.config.eos_token_id},
        pad_id=0,
        plans=None if plans is None else torch.tensor(plans),
    )


def _hf_greedy(hf, prompts, plans=None):
    rows = _hf_rows(hf, prompts, plans)
    return [r.tokens for r in rows], [r.plan for r in rows]


GREEDY = SamplingConfig(max_tokens=TOKENS, temperature=0.0)


def _count_preemptions(engine):
    sched = engine.llm.llm_engine.engine_core.engine_core.scheduler
    counter = {"n": 0}
    inner = sched._preempt_request

    def counting(*a, **k):
        counter["n"] += 1
        return inner(*a, **k)

    sched._preempt_request = counting
    return counter, lambda: setattr(sched, "_preempt_request", inner)


def test_export_names_the_routed_architecture(routed_export, quick_model_dir, tmp_path):
    from rl.serving.export import ExportError, export

    assert json.loads((routed_export / "config.json").read_text())["architectures"] == ["ExitrlRoutedQwen3ForCausalLM"]
    assert (routed_export / "routers.safetensors").exists()
    plain = export(quick_model_dir, tmp_path / "plain", dtype="float32")
    assert json.loads((plain / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    with pytest.raises(ExportError, match="no routers.safetensors"):
        export(quick_model_dir, tmp_path / "bad", routers=tmp_path)


def test_mixed_plan_batch_equals_the_transformers_routed_model(engine, hf, prompts):
    """Eight requests with six different plans (layer 0 skipped, repeats, all-execute) in one
    engine call: each request's greedy tokens equal the transformers model's under its plan."""
    from vllm import SamplingParams

    from rollout.routing.vllm_plugin import PLAN_KEY, plan_salt

    L = hf.num_layers
    plans = [[1] * L, [0] + [1] * (L - 1), [1, 2] + [1] * (L - 2), [1, 0, 1, 0][:L] + [1] * (L - 4)]
    plans = [plans[i % len(plans)] for i in range(len(prompts))]
    plans[5] = [2] * L
    plans[6] = [1] * (L - 1) + [0]
    params = [
        SamplingParams(max_tokens=TOKENS, temperature=0.0, detokenize=False, logprobs=0, extra_args={PLAN_KEY: p})
        for p in plans
    ]
    outs = engine.llm.generate(
        [{"prompt_token_ids": q, "cache_salt": plan_salt(p)} for q, p in zip(prompts, plans)], params, use_tqdm=False
    )
    rows = _hf_rows(hf, prompts, plans)
    want, want_lp = [r.tokens for r in rows], [r.logprobs for r in rows]
    got = [list(o.outputs[0].token_ids) for o in outs]
    assert len({tuple(p) for p in plans}) == 6
    assert got == want
    got_lp = [[d[t].logprob for t, d in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)] for o in outs]
    for g, w in zip(got_lp, want_lp):
        assert torch.allclose(torch.tensor(g), torch.tensor(w), atol=2e-3)
    # the plans really change the model: the same prompts' log-probs under all-execute and under
    # a skipped layer 0 are far apart (rows 0 and 4 share a plan, 1 skips layer 0)
    full = _hf_rows(hf, prompts[1:2], [plans[0]])[0]
    assert full.tokens != want[1] or max(abs(a - b) for a, b in zip(full.logprobs, want_lp[1])) > 0.05


def test_engine_decides_the_plans_the_transformers_model_decides(engine, hf, prompts):
    plans = engine.decide_plans(prompts)
    want = [hf.decide_plans(torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long))[0].tolist() for p in prompts]
    assert plans == want
    assert len({tuple(p) for p in plans}) >= 2  # the routers tell these prompts apart


def test_decided_plans_survive_preemption_and_recomputation(engine, hf, prompts):
    """No plan given: the routers decide at each request's first prefill. The small KV cache
    preempts requests and recomputes them from prompt + output; their plans stay as decided (a
    recomputation that re-routed on prompt + output would change them), tokens equal."""
    from vllm import SamplingParams

    from rollout.routing.vllm_plugin import decide_salt

    counter, restore = _count_preemptions(engine)
    try:
        params = SamplingParams(max_tokens=TOKENS, temperature=0.0, detokenize=False, ignore_eos=False)
        outs = engine.llm.generate(
            [{"prompt_token_ids": q, "cache_salt": decide_salt(f"pre-{i}")} for i, q in enumerate(prompts)],
            params,
            use_tqdm=False,
        )
    finally:
        restore()
    want, want_plans = _hf_greedy(hf, prompts)
    ids = [o.request_id for o in outs]
    decided = dict(zip(ids, engine.llm.apply_model(lambda m: m.plans_of(ids))[0]))
    assert counter["n"] > 0  # the case happened
    assert [decided[o.request_id] for o in outs] == want_plans
    assert [list(o.outputs[0].token_ids) for o in outs] == want


def test_plans_salt_the_prefix_cache(engine, hf, prompts):
    """The same prompt under plan A, then plan B: B's request gets no block computed under A
    (every layer's KV depends on the layers below it), a second B request does."""
    L = hf.num_layers
    a, b = [1] * L, [1, 0] + [1] * (L - 2)
    engine.llm.reset_prefix_cache()
    engine.generate_routed(prompts[:1], GREEDY, [a])
    first_b = engine.generate_routed(prompts[:1], GREEDY, [b])[0]
    again_b = engine.generate_routed(prompts[:1], GREEDY, [b])[0]
    want, _ = _hf_greedy(hf, prompts[:1], [b])
    assert first_b.cached_tokens == 0
    assert again_b.cached_tokens > 0
    assert first_b.completion_ids == want[0] == again_b.completion_ids


def test_a_request_aborted_mid_generation_leaves_the_others_exact(engine, hf, prompts):
    from vllm import SamplingParams

    from rollout.routing.vllm_plugin import PLAN_KEY, plan_salt

    L = hf.num_layers
    plans = [[1] * L, [0] + [1] * (L - 1), [1, 2] + [1] * (L - 2)]
    core = engine.llm.llm_engine
    for i, (q, p) in enumerate(zip(prompts[:3], plans)):
        sp = SamplingParams(max_tokens=TOKENS, temperature=0.0, detokenize=False, extra_args={PLAN_KEY: p})
        core.add_request(f"abort-{i}", {"prompt_token_ids": q, "cache_salt": plan_salt(p)}, sp)
    done, steps = {}, 0
    while core.has_unfinished_requests():
        for o in core.step():
            if o.finished:
                done[o.request_id] = list(o.outputs[0].token_ids)
        steps += 1
        if steps == 5:
            core.abort_request(["abort-1"])
    want, _ = _hf_greedy(hf, [prompts[0], prompts[2]], [plans[0], plans[2]])
    assert done["abort-0"] == want[0] and done["abort-2"] == want[1]
    assert len(done.get("abort-1", [])) < TOKENS


def test_generate_routed_groups_by_plan_and_checks_plans(engine, hf, prompts):
    L = hf.num_layers
    plans = [[1] * L if i % 2 else [0] + [1] * (L - 1) for i in range(4)]
    before = engine.llm.apply_model(lambda m: m.layer_passes)[0]
    gens = engine.generate_routed(prompts[:4], GREEDY, plans)
    passes = engine.llm.apply_model(lambda m: m.layer_passes)[0] - before
    want, _ = _hf_greedy(hf, prompts[:4], plans)
    assert [g.completion_ids for g in gens] == want
    assert [g.prompt_index for g in gens] == [0, 1, 2, 3]
    # one engine call per plan, each batch agreeing on every layer: a forward runs exactly its
    # plan's layers (L - 1 for the skipping call), one forward per generated token of the longest row
    skipping, full = max(len(w) for w in want[0::2]), max(len(w) for w in want[1::2])
    assert passes == (L - 1) * skipping + L * full
    with pytest.raises(ValueError, match="plan of 3 layers"):
        engine.generate_routed(prompts[:1], GREEDY, [[1, 1, 1]])


def test_plain_calls_on_a_routed_engine_run_every_layer(engine, hf, prompts):
    """Joint training's token rollouts run on the routed engine without a plan: every layer, as
    the learner scores them (no plan decided in the engine, so the prefix cache serves branches)."""
    L = hf.num_layers
    gens = engine.generate(prompts[:3], GREEDY)
    want, _ = _hf_greedy(hf, prompts[:3], [[1] * L] * 3)
    assert [g.completion_ids for g in gens] == want
    again = engine.generate([prompts[0] + want[0][:8]], GREEDY)[0]  # a branch off the first rollout
    assert again.cached_tokens >= 32


def test_generate_routed_in_one_mixed_batch(engine, hf, prompts):
    """``group_by_plan=False`` (joint training's layer variants): one engine call whose batch mixes
    four plans, each row exact under its own."""
    L = hf.num_layers
    plans = [[1] * L, [0] + [1] * (L - 1), [1, 2] + [1] * (L - 2), [1] * (L - 1) + [0]]
    gens = engine.generate_routed(prompts[:4], GREEDY, plans, group_by_plan=False)
    rows = _hf_rows(hf, prompts[:4], plans)
    assert [g.completion_ids for g in gens] == [r.tokens for r in rows]
    assert [g.plan for g in gens] == plans
    for g, r in zip(gens, rows):
        assert torch.allclose(torch.tensor(g.logprobs), torch.tensor(r.logprobs), atol=2e-3)


def test_weight_sync_carries_the_routers(engine, hf, prompts, routed_export):
    """A learner whose routers (layer 0's skip and execute swapped) and decoder (final norm scaled)
    changed pushes both through ``policy_weights(..., routers_attr)``: the engine then decides the
    learner's plans and generates the learner's tokens and log-probs under them."""
    from transformers import AutoModelForCausalLM

    from rl.trainer.checkpoint import ROUTERS_ATTR
    from rollout.weight_sync import policy_weights

    before = engine.decide_plans(prompts)
    learner = AutoModelForCausalLM.from_pretrained(routed_export, dtype=torch.float32).eval()
    routers = LayerRouters.load(routed_export)
    with torch.no_grad():
        routers.w2[0] = routers.w2[0][:, [1, 0, 2]].clone()
        routers.b2[0] = routers.b2[0][[1, 0, 2]].clone()
        learner.model.norm.weight.mul_(1.3)  # the final norm: every plan runs it
    setattr(learner, ROUTERS_ATTR, routers)
    names = [n for n, _ in policy_weights(learner, routers_attr=ROUTERS_ATTR)]
    assert {"routers.w1", "routers.b1", "routers.w2", "routers.b2"} <= set(names)
    try:
        engine.load_weights(policy_weights(learner, routers_attr=ROUTERS_ATTR))
        after = engine.decide_plans(prompts)
        mine = RoutedModel(learner, routers)
        ones = [torch.ones(1, len(p), dtype=torch.long) for p in prompts]
        assert after == [mine.decide_plans(torch.tensor([p]), o)[0].tolist() for p, o in zip(prompts, ones)]
        assert [a[0] for a in after] == [1 - b[0] for b in before]  # every layer-0 decision flipped
        gens = engine.generate_routed(prompts, GREEDY, after, group_by_plan=False)
        rows = _hf_rows(mine, prompts, after)
        assert [g.completion_ids for g in gens] == [r.tokens for r in rows]
        for g, r in zip(gens, rows):
            assert torch.allclose(torch.tensor(g.logprobs), torch.tensor(r.logprobs), atol=2e-3)
        stale = _hf_rows(hf, prompts, after)  # the engine's old decoder would have given these
        assert any(s.tokens != r.tokens or abs(s.logprobs[0] - r.logprobs[0]) > 0.01 for s, r in zip(stale, rows))
    finally:
        original = AutoModelForCausalLM.from_pretrained(routed_export, dtype=torch.float32)
        setattr(original, ROUTERS_ATTR, LayerRouters.load(routed_export))
        engine.load_weights(policy_weights(original, routers_attr=ROUTERS_ATTR))
    assert engine.decide_plans(prompts) == before


def test_joint_training_rolls_out_on_the_routed_engine(quick_model_dir, tmp_path, prompts, monkeypatch):
    """``rollout.backend: vllm`` with ``layers.enabled``: the trainer's engine loads the routed model
    (base weights + the routers at their start), the layer variants are generated in it under the
    learner's sampled plans, and the step's weight sync leaves the engine's routers equal to the
    learner's moved ones: same plans decided, same tokens and log-probs under them."""
    from pathlib import Path

    import rl.trainer.layer_stage as layer_mod
    from rl.data.problems import load_problems
    from rl.trainer.config import TrainConfig
    from rl.trainer.config_loading import load_config
    from rl.trainer.loop import build_trainer
    from rl.trainer.step import training_step

    root = Path(__file__).resolve().parents[1]
    # variants earn 1 - executed / L whatever they answer: advantages differ, the routers move
    monkeypatch.setattr(layer_mod, "layer_group_rewards", lambda c, e, cfg, *_: 1.0 - e.float() / e[:, -1:].float())
    calls = []
    cfg = load_config(
        TrainConfig,
        root / "configs" / "tiny_sgrpo.yaml",
        [
            f"model.path={quick_model_dir}",
            f"run.out_dir={tmp_path}",
            "rollout.backend=vllm",
            "rollout.prompts_per_step=4",
            "rollout.max_tokens=32",
            "rollout.serial.num_exits=2",
            "rollout.serial.answer_max_tokens=6",
            "optim.warmup_steps=0",
            "layers.enabled=true",
            "layers.variants=3",
            "layers.router_lr=0.05",
            "layers.answer_max_tokens=4",
        ],
    )
    t = build_trainer(cfg, None)
    try:
        assert t.backend.routed and t.backend.plain_plan == [1] * t.backend.num_layers
        start = t.routers.w2.detach().clone()
        inner = t.backend.generate_routed
        monkeypatch.setattr(t.backend, "generate_routed", lambda *a, **k: calls.append(len(a[0])) or inner(*a, **k))
        metrics = training_step(t, load_problems(cfg.data)[:4], 1)
        assert calls == [4 * 3]  # every full rollout's 3 variants, in one engine call
        assert metrics["layers/policy_sequences"] > 0
        assert 0.97 < metrics["learn/is_raw_mean"] < 1.03  # engine log-probs = the learner's
        engine_w2 = t.backend.llm.apply_model(lambda m: m.routers.w2.detach().cpu().clone())[0]
        assert not torch.equal(t.routers.w2.detach(), start)  # the routers moved ...
        assert torch.equal(engine_w2, t.routers.w2.detach().cpu())  # ... and the engine has them
        learner = RoutedModel(t.raw_model, t.routers)
        ones = [torch.ones(1, len(p), dtype=torch.long) for p in prompts]
        want = [learner.decide_plans(torch.tensor([p]), o)[0].tolist() for p, o in zip(prompts, ones)]
        assert t.backend.decide_plans(prompts) == want
        gens = t.backend.generate_routed(prompts[:4], GREEDY, want[:4], group_by_plan=False)
        rows = _hf_rows(learner, prompts[:4], want[:4])
        assert [g.completion_ids for g in gens] == [r.tokens for r in rows]
        for g, r in zip(gens, rows):
            assert torch.allclose(torch.tensor(g.logprobs), torch.tensor(r.logprobs), atol=2e-3)
    finally:
        t.verifier.close()
        del t


def test_serve_a_routed_export_reports_its_layers(routed_export, hf, prompts):
    """``exitrl serve`` of the routed export: each request's plan is decided by the routers inside
    vLLM from its prompt (= the transformers model's plan), it runs under it (= the transformers
    model's greedy tokens under that plan), and ``usage`` says so; the same prompt again is served
    from the plan's prefix cache; FFS and the thinking budget work unchanged."""
    from openai import OpenAI
    from transformers import AutoTokenizer

    from rl.serving.server import ServeConfig, Served

    tok = AutoTokenizer.from_pretrained(routed_export)
    want, want_plans = _hf_greedy(hf, prompts[:4])
    assert len({tuple(p) for p in want_plans}) >= 2  # the routers give these prompts different plans
    cfg = ServeConfig(model_dir=str(routed_export), port=0, max_model_len=512, api_key="k", served_model_name="r")
    s = Served(dataclasses.replace(cfg, vllm_args=["--block-size", "32"]))  # blocks short prompts fill
    try:
        client = OpenAI(base_url=s.url + "/v1", api_key="k", max_retries=0)
        for p, w, plan in zip(prompts[:4], want, want_plans):
            r = client.completions.create(model="r", prompt=p, max_tokens=TOKENS, temperature=0)
            u = r.usage.model_dump()
            assert u["layer_plan"] == plan and u["layers_executed"] == sum(plan) and u["num_layers"] == hf.num_layers
            eos = tok.eos_token_id
            assert r.choices[0].text == tok.decode(w[: w.index(eos)] if eos in w else w, skip_special_tokens=False)
        again = client.completions.create(model="r", prompt=prompts[0], max_tokens=TOKENS, temperature=0)
        assert again.usage.model_dump()["layer_plan"] == want_plans[0]
        metrics = httpx.get(s.url + "/metrics", headers={"Authorization": "Bearer k"}).text
        assert float(re.search(r"^vllm:prefix_cache_hits_total\{[^}]*\} (\S+)", metrics, re.M).group(1)) > 0
        msgs = [{"role": "user", "content": heldout_problems(1)[0].problem}]
        r = client.chat.completions.create(
            model="r", messages=msgs, max_tokens=200, temperature=1.0, extra_body={"ffs_n": 3}
        )
        u = r.usage.model_dump()
        assert u["ffs_n"] == 3 and len(u["layer_plan"]) == hf.num_layers
        r = client.chat.completions.create(
            model="r", messages=msgs, max_tokens=60, temperature=0, extra_body={"thinking_budget": 4}
        )
        assert "Time is limited" in (r.choices[0].message.reasoning or "") + (r.choices[0].message.content or "")
        assert r.usage.model_dump()["layer_plan"] is not None
        with pytest.raises(Exception, match="one prompt per request"):
            client.completions.create(model="r", prompt=[prompts[0], prompts[1]], max_tokens=4)
    finally:
        s.stop()
    assert s.upstream.proc.poll() is not None


@pytest.mark.slow  # the CLI path is in make test with the MoE policy (test_vllm_routed_families.py)
def test_joint_training_on_vllm_through_the_cli(quick_model_dir, tmp_path):
    """``exitrl train`` with ``layers.enabled`` and ``rollout.backend=vllm``: one step, exit 0, the
    layer metrics written and the routers checkpointed."""
    from tests.conftest import run_exitrl_train

    args = [
        f"model.path={quick_model_dir}", f"run.out_dir={tmp_path}", "run.steps=1", "run.save_every=1",
        "run.eval_every=0", "rollout.backend=vllm", "rollout.prompts_per_step=2", "rollout.max_tokens=24",
        "rollout.serial.num_exits=2", "rollout.serial.answer_max_tokens=6", "layers.enabled=true",
        "layers.variants=2", "layers.answer_max_tokens=4",
    ]  # fmt: skip
    run_exitrl_train(args)
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["step"] == 1 and row["layers/executed_mean"] > 0  # (the engine = learner check: the test above)
    assert (tmp_path / "checkpoints" / "step-000001" / "model" / "routers.safetensors").exists()


def test_a_routed_engine_for_an_architecture_it_does_not_implement_is_refused_by_name(quick_model_dir, tmp_path):
    from pathlib import Path

    from rollout.routing.vllm_plugin import routed_engine_folder

    phi3 = tmp_path / "phi3"
    phi3.mkdir()
    cfg = json.loads((Path(quick_model_dir) / "config.json").read_text())
    (phi3 / "config.json").write_text(json.dumps({**cfg, "model_type": "phi3", "architectures": ["Phi3ForCausalLM"]}))
    routers = LayerRouters(RouterConfig(cfg["num_hidden_layers"], cfg["hidden_size"], 16, 2))
    with pytest.raises(ValueError, match="not 'phi3'; train the layer level of this model with rollout.backend hf"):
        routed_engine_folder(phi3, routers, tmp_path / "out")


def test_eval_with_routers_on_vllm_equals_the_hf_backend(quick_model_dir, routed_export, tmp_path):
    """``exitrl eval --routers --backend vllm`` (the routed vLLM model, in the model's float32) and
    ``--backend hf`` generate the same greedy responses under the same plans."""
    import subprocess
    import sys
    from pathlib import Path

    def run(backend: str) -> list[dict]:
        saved = tmp_path / f"{backend}.jsonl"
        cmd = [
            sys.executable, "-m", "rl.cli", "eval", "--model", str(quick_model_dir), "--benchmarks", "synthetic",
            "--limit", "6", "--max-tokens", "40", "--routers", str(routed_export), "--backend", backend,
            "--save-responses", str(saved), "--json",
        ]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=Path(__file__).resolve().parents[1])
        assert r.returncode == 0, r.stderr[-3000:]
        return sorted((json.loads(x) for x in saved.read_text().splitlines()), key=lambda x: x["id"])

    hf, vllm = run("hf"), run("vllm")
    assert [x["plan"] for x in vllm] == [x["plan"] for x in hf] and len({tuple(x["plan"]) for x in hf}) >= 2
    assert [x["response"] for x in vllm] == [x["response"] for x in hf]
