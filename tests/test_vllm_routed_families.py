"""The routed vLLM model on every decoder family the trainer supports: tiny random-init Qwen2 (q/k/v
biases), Llama, Mistral (sliding window 8) and Qwen3-MoE with the tiny reasoner's tokenizer, exported
with routers (``exitrl export --routers``, float32). In vLLM the routers decide the same plans as the
transformers routed model, and greedy generation under given skip / execute / repeat plans gives the
same tokens. Each family's engine runs in a child process (the session's shared engine is another
model)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import run_exitrl_train

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from rollout.backends.vllm import VLLMBackend
from rollout.routing.routed_generation import routed_generate
from rollout.routing.routed_model import RoutedModel
from rollout.routing.routers import LayerRouters
from rollout.types import SamplingConfig

export, prompts, plans = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
tok = AutoTokenizer.from_pretrained(export)
hf = RoutedModel(AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval(), LayerRouters.load(export))
eos = {tok.eos_token_id}

def hf_rows(given=None):
    with torch.no_grad():
        rows = routed_generate(hf, prompts, max_tokens=12, eos_ids=eos, pad_id=tok.pad_token_id or 0,
                               plans=None if given is None else torch.tensor(given))
    return [r.tokens for r in rows], [list(map(int, r.plan)) for r in rows]

be = VLLMBackend.from_pretrained(export, dtype="float32", seed=0, max_model_len=256)
want_tokens, want_plans = hf_rows()
got_plans = be.decide_plans(prompts)
gens = be.generate_routed(prompts, SamplingConfig(max_tokens=12, temperature=0.0), plans)
given_tokens, _ = hf_rows(plans)
print("EXITRL_RESULT " + json.dumps({
    "decided_equal": got_plans == want_plans,
    "plans": got_plans,
    "tokens_equal": [g.completion_ids for g in gens] == [t for t in given_tokens],
    "hf": given_tokens, "vllm": [g.completion_ids for g in gens],
}))
"""

COMMON = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
    head_dim=32, max_position_embeddings=256, tie_word_embeddings=False,
)  # fmt: skip


def _config(family: str, tok):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3MoeConfig

    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if family == "qwen2":
        return Qwen2Config(**COMMON, **ids)
    if family == "llama":
        return LlamaConfig(**COMMON, **ids)
    if family == "mistral":
        return MistralConfig(**COMMON, **ids, sliding_window=8)
    return Qwen3MoeConfig(**COMMON, **ids, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)


@pytest.mark.parametrize(
    "family",
    [
        "qwen3_moe",  # MoE layers
        # sliding windows, q/k/v biases, plain Llama: the same mixin (about 33 s each): make test-slow
        *(pytest.param(f, marks=pytest.mark.slow) for f in ("mistral", "qwen2", "llama")),
    ],
)
def test_routed_vllm_equals_routed_transformers(family, quick_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rl.data.prompts import build_prompt
    from rl.data.synthetic_task import heldout_problems
    from rl.serving.export import export
    from rollout.routing.routers import LayerRouters, RouterConfig

    tok = AutoTokenizer.from_pretrained(quick_model_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(family, tok), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)  # random init is near zero: larger weights make a wrong layer visible
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    routers = LayerRouters(RouterConfig(num_layers=3, hidden_size=64, router_hidden=16, num_windows=2))
    with torch.no_grad():
        routers.w2.mul_(20.0)  # decisive routers: mixed actions across layers and prompts
    out = export(tmp_path / "model", tmp_path / "export", dtype="float32", routers=routers.save(tmp_path / "routers"))
    assert json.loads((out / "config.json").read_text())["architectures"][0].startswith("ExitrlRouted")
    prompts = [tok(build_prompt(tok, p.problem), add_special_tokens=False)["input_ids"] for p in heldout_problems(4)]
    plans = [[1, 0, 1], [2, 1, 1], [1, 1, 2], [1, 1, 1]]  # skip, repeat (first, last layer), all-execute
    r = subprocess.run(
        [sys.executable, "-c", CHILD, str(out), json.dumps(prompts), json.dumps(plans)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    line = next((x for x in r.stdout.splitlines() if x.startswith("EXITRL_RESULT ")), None)
    assert line is not None, r.stderr[-3000:]
    rep = json.loads(line[len("EXITRL_RESULT ") :])
    assert rep["decided_equal"], rep
    assert rep["tokens_equal"], rep
    assert len({tuple(p) for p in plans}) == 4 and rep["hf"][0] != rep["hf"][3]  # the plans change the tokens


def alternating(group):
    """A reward for tests: members alternately right, so every group has an advantage to learn from."""
    return [float(i % 2) for i in range(len(group.completions))]


@pytest.mark.parametrize(
    "family",
    [
        "qwen3_moe",
        # the dense families take the same path (about 25 s each): make test-slow
        *(pytest.param(f, marks=pytest.mark.slow) for f in ("qwen2", "llama", "mistral")),
    ],
)
def test_joint_training_on_vllm_keeps_the_sampler_equal_to_the_learner(family, quick_model_dir, tmp_path):
    """``exitrl train`` with ``layers.enabled`` and ``rollout.backend=vllm`` on a tiny policy of the
    family: two steps, each with a policy update and a weight sync into the routed engine (for MoE:
    the experts re-packed); at the second step the learner/sampler importance ratios of the sampled
    tokens stay within 1e-3 of 1."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(quick_model_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(family, tok), dtype=torch.float32)
    model.save_pretrained(tmp_path / "moe")
    tok.save_pretrained(tmp_path / "moe")
    args = [
        f"model.path={tmp_path / 'moe'}", f"run.out_dir={tmp_path / 'run'}", "run.steps=2", "run.save_every=2",
        "run.eval_every=0", "rollout.backend=vllm", "rollout.prompts_per_step=2", "rollout.max_tokens=16",
        "rollout.serial.num_exits=2", "rollout.serial.answer_max_tokens=4", "layers.enabled=true",
        "layers.variants=2", "layers.answer_max_tokens=4", "optim.lr=1e-3", "optim.warmup_steps=0",
        "loss.reward=tests.test_vllm_routed_families:alternating",
    ]  # fmt: skip
    run_exitrl_train(args)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [1, 2] and rows[1]["layers/executed_mean"] > 0
    step2 = rows[1]
    assert abs(step2["learn/is_raw_min"] - 1) < 1e-3 and abs(step2["learn/is_raw_max"] - 1) < 1e-3, step2
