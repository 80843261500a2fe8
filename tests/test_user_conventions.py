"""What users bring: R1-style templates that open <think> in the prompt, tokenizers with pad == eos,
reward plug-ins, and the recipe's prompt options."""

from __future__ import annotations

import sys

import pytest

from rewards.verify import verify_answer
from rl.data.problems import DataConfig, Problem, drop_overlong, encode_prompts
from rl.data.prompts import build_prompt
from rollout.thinking import prompt_opens_thinking, scored_text, think_tag_ids
from rollout.types import ANSWER, THINK, Generation, RolloutSequence

R1_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n' }}{% endif %}"
)
CUT_OFF = "Okay, so 3*5 = 15. Hmm, wait, let me double check"  # no tags: cut at the length limit


@pytest.fixture(scope="module")
def r1_tok(quick_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(quick_model_dir))
    tok.chat_template = R1_TEMPLATE
    return tok


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_r1_prompt_opens_thinking_and_a_cut_off_completion_scores_zero(r1_tok):
    tok = r1_tok
    prompt = _ids(tok, build_prompt(tok, "What is 3*5?"))
    open_id, close_id = think_tag_ids(tok)
    assert prompt_opens_thinking(prompt, open_id, close_id)
    assert verify_answer(CUT_OFF, "15")  # the trap: read alone, the whole thinking is the answer
    cut = scored_text(tok, prompt, _ids(tok, CUT_OFF))
    assert cut.startswith("<think>") and not verify_answer(cut, "15")
    done = scored_text(tok, prompt, _ids(tok, CUT_OFF + " ok.\n</think>\n\nThe answer is \\boxed{15}."))
    assert verify_answer(done, "15")
    # a Qwen3-style prompt (the completion opens <think> itself) is left as it is
    qwen_prompt = _ids(tok, "<|im_start|>user\nWhat is 3*5?<|im_end|>\n<|im_start|>assistant\n")
    assert not prompt_opens_thinking(qwen_prompt, open_id, close_id)
    assert scored_text(tok, qwen_prompt, _ids(tok, CUT_OFF)) == tok.decode(_ids(tok, CUT_OFF))


def _seq(prompt, completion, group=0, full=True):
    n = len(completion)
    return RolloutSequence(group, prompt, completion, [THINK] * (n - 1) + [ANSWER], [0.0] * n, n, full, "stop")


class _Verifier:
    def verify(self, texts, golds):
        return [verify_answer(t, g) for t, g in zip(texts, golds)]


def test_training_and_evaluation_score_an_unclosed_r1_thought_zero(r1_tok):
    from rl.evaluation.run import _token_record
    from rl.evaluation.scoring import score_records
    from rl.trainer.config import TrainConfig
    from rl.trainer.step import step_rewards

    tok = r1_tok
    prompt = _ids(tok, build_prompt(tok, "What is 3*5?"))
    cut, done = _ids(tok, CUT_OFF), _ids(tok, CUT_OFF + "\n</think>\n\n\\boxed{15}")
    problems = [Problem("p0", "What is 3*5?", "15")]
    cfg = TrainConfig()
    cfg.rollout.algorithm = "grpo"
    correct, rewards = step_rewards([_seq(prompt, cut), _seq(prompt, done)], [[0, 1]], problems, tok, cfg, _Verifier())
    assert correct == [False, True] and rewards == [0.0, 1.0]
    open_id, close_id = think_tag_ids(tok)
    for completion, want in ((cut, 0.0), (done, 1.0)):
        rec = {
            "id": "p0",
            "sample": 0,
            **_token_record(tok, Generation(prompt, completion, [], "length"), open_id, close_id),
        }
        report = score_records([rec], problems, "greedy", 1, _Verifier().verify)
        assert report["accuracy"] == want
        assert report["unclosed_thinking_share"] == (1.0 if want == 0.0 else 0.0)


def test_hf_first_finish_with_pad_equal_to_eos(quick_model_dir):
    """R1-Distill's tokenizer pads with its EOS: the finisher keeps its EOS and reads 'stop', the
    others read 'abort' at the same length. Row 0 of each prompt is made to emit EOS at step 5."""
    from transformers import AutoTokenizer

    from rollout.backends.hf import HFBackend
    from rollout.types import SamplingConfig

    tok = AutoTokenizer.from_pretrained(str(quick_model_dir))
    tok.pad_token = "<|im_end|>"
    be = HFBackend.from_pretrained(str(quick_model_dir))
    be.tokenizer = tok
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    assert be.pad_id == eos and eos in be.eos_ids
    prompts = [_ids(tok, build_prompt(tok, f"Start at {k}. Apply in order: 1: +3. Work modulo 10.")) for k in (1, 2)]
    n, at = 4, 5

    def force_eos(step, rows, scores):
        if step == at:
            forced = rows % n == 0
            scores[forced] = -float("inf")
            scores[forced, eos] = 0.0
        return scores

    be.logits_processor = force_eos
    assert len(prompts[0]) == len(prompts[1])
    groups = be.generate_first_finish(prompts, SamplingConfig(max_tokens=40, temperature=1.0, n=n, seed=1))
    for samples in groups:
        winner, others = samples[0], samples[1:]
        assert winner.finish_reason == "stop" and winner.completion_ids[-1] == eos and winner.num_tokens == at + 1
        assert all(s.finish_reason == "abort" and s.num_tokens == at + 1 for s in others if eos not in s.completion_ids)
        assert sum(s.finish_reason == "abort" for s in others) >= 1
    # plain generation keeps the EOS of a finished row too
    gens = be.generate(prompts[:1], SamplingConfig(max_tokens=40, temperature=1.0, n=n, seed=1))
    assert gens[0].finish_reason == "stop" and gens[0].completion_ids[-1] == eos and gens[0].num_tokens == at + 1


def test_reward_plugin_gets_prompts_completions_golds_rows(tmp_path, monkeypatch, r1_tok):
    from rl.trainer.config import TrainConfig
    from rl.trainer.step import step_rewards

    (tmp_path / "my_rewards.py").write_text(
        "SEEN = []\n"
        "def brevity(group):\n"
        "    SEEN.append(group)\n"
        "    return [float(ok) - 0.01 * len(c) for ok, c in zip(group.correct, group.completions)]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    tok = r1_tok
    prompt = _ids(tok, build_prompt(tok, "What is 3*5?"))
    short, long = _ids(tok, "\n</think>\n\n\\boxed{15}"), _ids(tok, "let me see 3*5\n</think>\n\n\\boxed{15}")
    problems = [Problem("p0", "What is 3*5?", "15", {"difficulty": 2, "source": "hand"})]
    cfg = TrainConfig()
    cfg.loss.reward = "my_rewards:brevity"
    correct, rewards = step_rewards(
        [_seq(prompt, short), _seq(prompt, long)], [[0, 1]], problems, tok, cfg, _Verifier()
    )
    seen = sys.modules["my_rewards"].SEEN[0]
    assert correct == [True, True]
    assert rewards == pytest.approx([1 - 0.01 * len(seen.completions[0]), 1 - 0.01 * len(seen.completions[1])])
    assert rewards[0] > rewards[1]
    assert seen.golds == ["15", "15"] and seen.prompts[0].endswith("<think>\n")
    assert seen.rows[0] == {"id": "p0", "problem": "What is 3*5?", "answer": "15", "difficulty": 2, "source": "hand"}


def test_prompt_options_and_overlong_prompts(r1_tok):
    tok = r1_tok
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
    )
    p = Problem("a", "What is 1+1?", "2")
    cfg = DataConfig(system_prompt="Be brief.", template_kwargs={"enable_thinking": False}, instruction="Box it.")
    text = build_prompt(tok, p.problem, cfg.instruction, cfg.system_prompt, True, cfg.template_kwargs)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 1+1?\nBox it.<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert build_prompt(tok, p.problem, "Box it.", None, False) == "What is 1+1?\nBox it.\n"
    problems = [p, Problem("b", "What is " + "1+" * 200 + "1?", "201")]
    ids = encode_prompts(tok, problems, DataConfig())
    limit = len(ids[0]) + 5
    kept, dropped = drop_overlong(tok, problems, DataConfig(max_prompt_tokens=limit))
    assert [q.id for q in kept] == ["a"] and dropped == 1 and len(ids[1]) > limit
