"""bench trainer --profile's stage profiler on a real model: the stages are the labelled library
calls of the second step only, and they partition the step."""

import torch
from transformers import AutoModelForCausalLM

from rl.bench.step_profile import PREFIX, StepProfiler


def _counts(sp: StepProfiler) -> dict[str, int]:
    return {e.key[len(PREFIX) :]: e.count for e in sp.prof.key_averages() if e.key.startswith(PREFIX)}


def test_profiles_the_second_step_by_stage(quick_model_dir):
    torch.manual_seed(0)
    with StepProfiler() as sp:
        model = AutoModelForCausalLM.from_pretrained(quick_model_dir)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ids = torch.randint(3, 100, (2, 6))
        for new_tokens in (3, 8):  # first step (not profiled) decodes 3 tokens, the second 8
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True)
            loss = model(out).logits.float().logsumexp(-1).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            sp.step()
    counts = _counts(sp)
    # only the second step: one prefill and 7 decode forwards for 8 new tokens, one learner pass
    assert counts["generation/prefill"] == 1
    assert counts["generation/decode"] == 7
    assert counts["learner/forward-decoder"] == 1
    assert counts["learner/backward"] == 1
    assert counts["optimizer/step"] == 1 and counts["optimizer/clip"] == 1
    s = sp.summary()
    st = s["stages_s"]
    for k in ("generation/prefill", "generation/decode", "learner/forward", "learner/backward", "optimizer"):
        assert st[k] > 0, k
    assert st["reward"] == 0 and st["sync"] == 0
    labelled = sum(v for k, v in st.items() if k != "other")
    assert labelled <= s["step_s"] + 1e-3
    assert abs(labelled + st["other"] - s["step_s"]) < 5e-3  # the stages partition the step
    assert abs(sum(s["stages_share"].values()) - 1.0) < 0.01
    # the wrapped library functions are restored
    assert not hasattr(torch.Tensor.backward, "__wrapped__")
