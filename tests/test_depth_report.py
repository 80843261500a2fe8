"""The depth report: the earliest layer from which each answer token is the exit head's top-1."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from rl.evaluation.depth import answer_depth, depth_sequences


def _random_model(layers=5, seed=0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=61,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    m = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in m.model.layers.parameters():
            if p.dim() == 2:
                p.mul_(6.0)
    return m


def _brute_force_settle(model, ctx, ans):
    """Per answer token, the 1-based settle layer from full per-layer logits (None: never)."""
    ids = torch.tensor([ctx + ans])
    outs = []  # each decoder layer's output, caught by hooks (independent of the routed model)
    hooks = [
        layer.register_forward_hook(lambda _m, _i, o: outs.append(o[0] if isinstance(o, tuple) else o))
        for layer in model.model.layers
    ]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    L = model.config.num_hidden_layers
    assert len(outs) == L
    with torch.no_grad():
        top = torch.stack([model.lm_head(model.model.norm(h))[0].argmax(-1) for h in outs])  # [L, T]
    res = []
    for j, tok in enumerate(ans):
        pos = len(ctx) + j - 1
        hit = [bool(top[layer, pos] == tok) for layer in range(L)]
        settle = None
        for layer in range(L - 1, -1, -1):
            if not hit[layer]:
                break
            settle = layer + 1
        res.append((hit, settle))
    return res


def test_answer_depth_matches_per_layer_logits():
    model = _random_model()
    g = torch.Generator().manual_seed(1)
    seqs = []
    for n_ctx in (6, 9, 4):
        ctx = torch.randint(3, 61, (n_ctx,), generator=g).tolist()
        # answers: the model's own greedy tokens (top-1 at the last layer) plus one random token
        ids = torch.tensor([ctx])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        seqs.append((ctx, out[0, n_ctx:].tolist() + [int(torch.randint(3, 61, (1,), generator=g))]))
    rep = answer_depth(model, seqs, pad_id=0, batch_size=2)
    want = [x for c, a in seqs for x in _brute_force_settle(model, c, a)]
    L = 5
    assert rep["answer_tokens"] == len(want) == 15
    settles = [s for _, s in want]
    assert rep["final_top1_share"] == round(sum(s is not None for s in settles) / 15, 4)
    assert rep["final_top1_share"] >= 12 / 15  # the greedy tokens are top-1 at the last layer
    hist = [sum(s == layer + 1 for s in settles) for layer in range(L)]
    assert rep["settled_histogram"] == hist
    assert rep["top1_share_by_layer"] == [round(sum(h[layer] for h, _ in want) / 15, 4) for layer in range(L)]
    assert len(set(hist)) > 1  # tokens settle at different depths
    assert rep["settled_share_by_layer"] == sorted(rep["settled_share_by_layer"])


CLOSED = "<think>\n1: 3+4=7\n</think>\nThe answer is \\boxed{7}.<|im_end|>"


def test_depth_sequences_read_the_answer_after_the_thinking(quick_model_dir):
    from transformers import AutoTokenizer

    from rl.evaluation.run import load_benchmark

    tok = AutoTokenizer.from_pretrained(quick_model_dir)
    probs = load_benchmark("synthetic", limit=3)
    recs = [
        {
            "id": probs[0].id,
            "sample": 0,
            "response": "<think>\n1: 3+4=7\n</think>\nThe answer is \\boxed{7}.<|im_end|>",
        },
        {"id": probs[1].id, "sample": 0, "response": "<think>\n1: 3+4=7\n"},  # never closed: no answer
        {"id": "not-in-the-benchmark", "sample": 0, "response": "</think>x"},
    ]
    seqs = depth_sequences(tok, recs, probs)
    assert len(seqs) == 1
    ctx, ans = seqs[0]
    assert ctx[-1] == tok.convert_tokens_to_ids("</think>")
    assert tok.decode(ans) == "\nThe answer is \\boxed{7}."  # the end-of-turn token left out


def test_eval_depth_report_on_saved_responses(quick_model_dir, tmp_path):
    from rl.evaluation.run import load_benchmark

    probs = load_benchmark("synthetic", limit=4)
    resp = tmp_path / "responses.jsonl"
    with resp.open("w") as f:
        for p in probs:
            text = f"<think>\nok\n</think>\nThe answer is \\boxed{{{p.answer}}}.<|im_end|>"
            f.write(json.dumps({"benchmark": "synthetic", "id": p.id, "sample": 0, "response": text}) + "\n")
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "rl.cli", "eval", "--model", str(quick_model_dir), "--responses", str(resp)]
    cmd += ["--benchmarks", "synthetic", "--limit", "4", "--depth-report", "--out", str(out), "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    depth = json.loads(res.stdout.strip().splitlines()[-1])["benchmarks"]["synthetic"]["depth"]
    assert depth["num_layers"] == 4 and depth["answer_tokens"] >= 4 * 8
    assert len(depth["top1_share_by_layer"]) == 4 and sum(depth["settled_histogram"]) <= depth["answer_tokens"]
    assert (out / "answer_depth.png").exists()
    res = subprocess.run(cmd[:4] + cmd[6:], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "--depth-report needs --model" in res.stderr
