"""Serial groups: exit strategies, thinking spans, masks and regions (scripted backend), and the
real HF backend's prefix-KV branches matching plain generation."""

import random

import pytest

from rollout.backends.base import Capabilities, RolloutBackend
from rollout.serial_group import (
    SerialGroupConfig,
    even_positions,
    parallel_group_rollout,
    serial_group_rollout,
    uniform_positions,
    window_positions,
)
from rollout.thinking import DEFAULT_EXIT_PROMPT, encode_in_context, thinking_span, thinking_tokens
from rollout.types import ANSWER, EXIT_PROMPT, THINK, Generation, SamplingConfig


def test_uniform_positions_are_distinct_sorted_seeded():
    a = uniform_positions(100, 4, random.Random(3))
    assert a == sorted(set(a)) and len(a) == 4 and all(1 <= p <= 100 for p in a)
    assert a == uniform_positions(100, 4, random.Random(3))
    assert uniform_positions(3, 8, random.Random(0)) == [1, 2, 3]  # thinking shorter than m
    assert uniform_positions(0, 4, random.Random(0)) == []  # empty thinking: no exits


def test_window_and_even_positions():
    cfg = SerialGroupConfig(window=(0.1, 0.9))
    for seed in range(20):
        pos = window_positions(200, 6, random.Random(seed), cfg)
        assert len(pos) == 6 and all(20 <= p <= 180 for p in pos)
    assert even_positions(10, 4) == [2, 4, 6, 8]
    assert even_positions(2, 4) == [1, 2]
    assert window_positions(0, 4, random.Random(0), cfg) == []


def test_thinking_span():
    OPEN, CLOSE = 3, 4
    assert thinking_span([OPEN, 9, 9, 9, CLOSE, 7, 2], OPEN, CLOSE) == (1, 4, True)
    assert thinking_span([9, 9, CLOSE, 7], OPEN, CLOSE) == (0, 2, True)  # <think> was in the prompt
    assert thinking_span([OPEN, 9, 9, 9], OPEN, CLOSE) == (1, 4, False)  # truncated, never closed
    # the one count used by training metrics, evaluation and the demo: tags excluded
    assert thinking_tokens([OPEN, 9, 9, 9, CLOSE, 7, 2], OPEN, CLOSE) == 3
    assert thinking_tokens([9, 9, CLOSE, 7], OPEN, CLOSE) == 2
    assert thinking_tokens([OPEN, 9, 9, 9], OPEN, CLOSE) == 3
    assert thinking_tokens([], OPEN, CLOSE) == 0


class ScriptedBackend(RolloutBackend):
    """Full rollouts and answers from a script; records the branch prompts it was asked for."""

    capabilities = Capabilities()  # no streaming: the serial group calls generate, then branches
    num_layers = 0

    def generate_first_finish(self, prompt_ids, sampling, finishers=1):
        raise NotImplementedError

    def decide_plans(self, prompt_ids):
        raise NotImplementedError

    def generate_routed(self, prompt_ids, sampling, plans, ignore_eos=False, group_by_plan=True):
        raise NotImplementedError

    def load_weights(self, named_tensors):
        raise NotImplementedError

    def __init__(self, tokenizer, completions, answer):
        self.tokenizer = tokenizer
        self.completions = completions
        self.answer = answer
        self.branch_prompts = []

    def generate(self, prompt_ids, sampling):
        return [
            Generation(p, c, [-0.1] * len(c), "stop" if c and c[-1] == 2 else "length", i)
            for i, (p, c) in enumerate(zip(prompt_ids, self.completions))
        ]

    def generate_branches(self, requests, sampling):
        out = []
        for ri, r in enumerate(requests):
            outs = []
            for c in r.cuts:
                self.branch_prompts.append(r.base_ids[:c] + r.suffix_ids)
                outs.append(
                    Generation(r.base_ids[:c] + r.suffix_ids, self.answer, [-0.5] * len(self.answer), "stop", ri)
                )
            out.append(outs)
        return out


def test_serial_group_layout(quick_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(quick_model_dir)
    OPEN, CLOSE = tok.convert_tokens_to_ids("<think>"), tok.convert_tokens_to_ids("</think>")
    think = tok("\n1: +5, 3+5=8\n", add_special_tokens=False)["input_ids"]
    ans = tok("\n\nThe answer is \\boxed{8}.<|im_end|>", add_special_tokens=False)["input_ids"]
    closed = [OPEN] + think + [CLOSE] + ans
    truncated = [OPEN] + think  # never closed
    empty = [OPEN, CLOSE] + ans  # no thinking at all
    answer = tok("The answer is \\boxed{8}.<|im_end|>", add_special_tokens=False)["input_ids"]
    be = ScriptedBackend(tok, [closed, truncated, empty], answer)
    prompts = [[1, 5, 6], [1, 5, 7], [1, 5, 8]]
    cfg = SerialGroupConfig(num_exits=3, strategy="even")
    batch = serial_group_rollout(be, prompts, SamplingConfig(max_tokens=64), cfg, seed=0)
    groups = batch.groups()
    exit_ids = encode_in_context(tok, DEFAULT_EXIT_PROMPT)
    assert tok.decode(exit_ids) == DEFAULT_EXIT_PROMPT

    g0 = groups[0]
    n = len(think)
    assert [s.exit_position for s in g0] == even_positions(n, 3) + [n]  # ordered earliest -> full
    assert [s.is_full for s in g0] == [False, False, False, True]
    for s in g0[:-1]:
        keep = 1 + s.exit_position
        assert s.completion_ids == closed[:keep] + exit_ids + answer
        assert s.regions == [THINK] * keep + [EXIT_PROMPT] * len(exit_ids) + [ANSWER] * len(answer)
        assert s.sampled_mask == [1] * keep + [0] * len(exit_ids) + [1] * len(answer)
        assert s.logprobs == [-0.1] * keep + [0.0] * len(exit_ids) + [-0.5] * len(answer)
    full = g0[-1]
    assert full.completion_ids == closed and full.regions == [THINK] * (n + 1) + [ANSWER] * (len(ans) + 1)
    # the branch prompt is prompt + thinking prefix + exit prompt: prefix shared with the full path
    assert be.branch_prompts[0] == prompts[0] + closed[: 1 + g0[0].exit_position] + exit_ids

    assert [s.is_full for s in groups[1]] == [False] * 3 + [True]  # truncated thinking still branches
    assert groups[1][-1].finish_reason == "length"
    assert batch.stats["unclosed_thinking"] == 1
    assert [s.is_full for s in groups[2]] == [True]  # empty thinking: the full rollout alone
    assert batch.num_groups == 3 and len(batch.sequences) == 4 + 4 + 1


def test_exit_prompt_must_close_thinking(quick_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(quick_model_dir)
    be = ScriptedBackend(tok, [[5]], [2])
    with pytest.raises(ValueError, match="does not close"):
        serial_group_rollout(be, [[1]], SamplingConfig(), SerialGroupConfig(exit_prompt="stop now\n"))
    with pytest.raises(ValueError, match="unknown exit strategy"):
        serial_group_rollout(be, [[1]], SamplingConfig(), SerialGroupConfig(strategy="random-walk"))


@pytest.fixture(scope="module")
def hf_backend(quick_model_dir):
    from rollout.backends.hf import HFBackend

    return HFBackend.from_pretrained(str(quick_model_dir), batch_size=16)


def _prompts(tok, n):
    from rl.data.prompts import build_prompt
    from rl.data.synthetic_task import heldout_problems

    return [tok(build_prompt(tok, p.problem), add_special_tokens=False)["input_ids"] for p in heldout_problems(n)]


def _greedy_branch_requests(backend, n: int, max_tokens: int, offsets: tuple[int, ...]):
    """Branch requests off ``n`` greedy full rollouts, cut ``offsets`` tokens past each prompt."""
    from rollout.types import BranchRequest

    tok = backend.tokenizer
    full = backend.generate(_prompts(tok, n), SamplingConfig(max_tokens=max_tokens, temperature=0))
    exit_ids = encode_in_context(tok, DEFAULT_EXIT_PROMPT)
    return [
        BranchRequest(g.prompt_ids + g.completion_ids, [len(g.prompt_ids) + k for k in offsets], exit_ids) for g in full
    ]


def test_hf_branches_reuse_prefix_and_match_plain_generation(hf_backend):
    reqs = _greedy_branch_requests(hf_backend, 3, max_tokens=40, offsets=(3, 17, 30))
    greedy = SamplingConfig(max_tokens=8, temperature=0)
    branched = hf_backend.generate_branches(reqs, greedy)
    for r, outs in zip(reqs, branched):
        plain = hf_backend.generate([r.base_ids[:c] + r.suffix_ids for c in r.cuts], greedy)
        for a, b in zip(outs, plain):
            assert a.completion_ids == b.completion_ids
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def test_hf_serial_and_parallel_groups(hf_backend):
    tok = hf_backend.tokenizer
    prompts = _prompts(tok, 4)
    s = SamplingConfig(max_tokens=48, temperature=1.0, seed=5)
    batch = serial_group_rollout(hf_backend, prompts, s, SerialGroupConfig(num_exits=2, answer_max_tokens=6), seed=1)
    for g in batch.groups():
        assert g[-1].is_full and all(not x.is_full for x in g[:-1])
        assert [x.exit_position for x in g] == sorted(x.exit_position for x in g)
        for x in g:
            assert len(x.completion_ids) == len(x.regions) == len(x.logprobs)
            assert all(lp <= 1e-6 for lp in x.logprobs)
    par = parallel_group_rollout(hf_backend, prompts, s, group_size=3)
    assert [len(g) for g in par.groups()] == [3, 3, 3, 3]
    assert par.stats["branch_tokens"] == 0


def test_hf_branches_from_the_full_rollouts_kv_match_a_fresh_prefill(hf_backend):
    """``generate_then_branch`` branches from the KV its full rollouts' decoding kept (no second
    prefill of prompt + thinking): same full rollouts as ``generate``, and the branches equal those
    decoded from a fresh prefill of the same prefixes, token for token."""
    from rollout.types import BranchRequest

    tok = hf_backend.tokenizer
    prompts = _prompts(tok, 6)
    exit_ids = encode_in_context(tok, DEFAULT_EXIT_PROMPT)
    full_s = SamplingConfig(max_tokens=60, temperature=1.0, seed=3)
    answer_s = SamplingConfig(max_tokens=8, temperature=0)

    def request(i, g):
        n = len(g.completion_ids)
        return BranchRequest(
            g.prompt_ids + g.completion_ids, [len(g.prompt_ids) + k for k in (1, n // 2, n - 1)], exit_ids
        )

    fulls, branches = hf_backend.generate_then_branch(prompts, full_s, request, answer_s)
    plain = hf_backend.generate(prompts, full_s)
    assert [g.completion_ids for g in fulls] == [g.completion_ids for g in plain]
    lens = [len(g.completion_ids) for g in fulls]
    assert sorted(lens)[1] < max(lens)  # 2 of 6 rows left the decoding batch early: their KV was copied out then
    prefilled = hf_backend.generate_branches([request(i, g) for i, g in enumerate(fulls)], answer_s)
    for outs, ref in zip(branches, prefilled):
        assert [a.completion_ids for a in outs] == [b.completion_ids for b in ref]
        for a, b in zip(outs, ref):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def test_hf_branch_buckets_decode_the_same_branches(hf_backend, monkeypatch):
    """Branches decoded in several buckets of similar cuts (less left padding) equal those of one
    padded batch, token for token."""
    reqs = _greedy_branch_requests(hf_backend, 4, max_tokens=48, offsets=(2, 20, 40))
    greedy = SamplingConfig(max_tokens=6, temperature=0)
    batches = []
    decode_branches = hf_backend._decode_branches

    def spy(chunk, *a):
        batches.append(chunk)
        return decode_branches(chunk, *a)

    monkeypatch.setattr(hf_backend, "_decode_branches", spy)
    runs = {}
    for cost in (1e12, 0):  # one padded batch; a bucket per distinct cut
        batches.clear()
        monkeypatch.setattr(hf_backend, "branch_bucket_cost", cost)
        runs[cost] = (hf_backend.generate_branches(reqs, greedy), len(batches))
    assert runs[1e12][1] == 1 and runs[0][1] >= 3  # 12 branches, at least 3 distinct cut lengths
    for a_outs, b_outs in zip(runs[1e12][0], runs[0][0]):
        assert [a.completion_ids for a in a_outs] == [b.completion_ids for b in b_outs]
        assert [a.prompt_ids for a in a_outs] == [b.prompt_ids for b in b_outs]
        for a, b in zip(a_outs, b_outs):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
