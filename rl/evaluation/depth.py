"""How much depth the answers need: for every answer token of the evaluated responses, the earliest
layer from which the exit head's top-1 (final norm + LM head on that layer's output) is the token
at that layer and every deeper one.

Teacher-forced on the saved response text (re-tokenised; the thinking and ``</think>`` are the
context, the answer after ``</think>`` is read out, its end-of-turn token left out): one forward per
batch with every layer's output kept, and all L layers' read-outs of the answer positions through
``kernels.exit_head`` in one pass (no per-layer logits). A token whose final-layer top-1 differs
(sampling, or a re-tokenisation that differs from the generated ids) never settles; its share is
reported as ``final_top1_share``.
"""

from __future__ import annotations

import torch

from rl.data.problems import DataConfig, Problem, encode_prompts
from rollout.routing.routed_generation import left_pad
from rollout.routing.routed_model import RoutedModel
from rollout.thinking import prompt_opens_thinking, think_tag_ids


def depth_sequences(
    tokenizer, records: list[dict], problems: list[Problem], prompt: DataConfig | None = None
) -> list[tuple[list[int], list[int]]]:
    """(context ids, answer ids) of each record with a closed thinking and a non-empty answer."""
    by_id = {p.id: p for p in problems}
    wanted = [r for r in records if r.get("id") in by_id and "</think>" in r.get("response", "")]
    ids = sorted({r["id"] for r in wanted})
    prompts = dict(zip(ids, encode_prompts(tokenizer, [by_id[i] for i in ids], prompt or DataConfig())))
    open_id, close_id = think_tag_ids(tokenizer)
    stop = {t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None}
    out = []
    for r in wanted:
        p_ids = prompts[r["id"]]
        text = r["response"]
        if prompt_opens_thinking(p_ids, open_id, close_id) and text.startswith("<think>"):
            text = text[len("<think>") :]  # scored_text put it there; the prompt already has it
        head, tail = text.split("</think>", 1)
        ctx = tokenizer(head + "</think>", add_special_tokens=False)["input_ids"]
        ans = tokenizer(tail, add_special_tokens=False)["input_ids"]
        while ans and ans[-1] in stop:
            ans = ans[:-1]
        if ans:
            out.append((list(p_ids) + ctx, ans))
    return out


@torch.no_grad()
def answer_depth(model, sequences: list[tuple[list[int], list[int]]], pad_id: int = 0, batch_size: int = 16) -> dict:
    """Per-layer top-1 shares and settle layers of the answer tokens of ``sequences``.

    Returns ``answer_tokens``, ``final_top1_share``, ``top1_share_by_layer`` [L] (the token is the
    read-out's top-1 at layer l), ``settled_share_by_layer`` [L] (top-1 at l and every deeper layer:
    the share of answer tokens the model has by layer l), ``settled_layer_mean`` (1-based, over
    tokens that settle) and ``settled_histogram`` [L]."""
    routed = RoutedModel(model, mode="grouped")
    L = routed.num_layers
    top1 = torch.zeros(L, dtype=torch.long)
    settled_hist = torch.zeros(L, dtype=torch.long)
    n_tokens = 0
    for s in range(0, len(sequences), batch_size):
        batch = sequences[s : s + batch_size]
        ids, attn = left_pad([c + a for c, a in batch], pad_id, routed.device)
        out = routed(ids, attn, output_layer_inputs=True, lm_head=False)
        T = ids.shape[1]
        rows = torch.cat([torch.full((len(a),), b, dtype=torch.long) for b, (_, a) in enumerate(batch)])
        cols = torch.cat([torch.arange(T - len(a), T) for _, a in batch])  # answers end each left-padded row
        outputs = out.layer_inputs[1:] + [out.hidden]  # layer l's output = layer l+1's input
        hidden = torch.stack([h[rows, cols - 1] for h in outputs])  # [L, n, d]: predicts the token at cols
        targets = ids[rows, cols]
        hit = (routed.readout(hidden, targets).argmax == targets).cpu()  # [L, n]
        suffix = hit.flip(0).to(torch.long).cumprod(0).flip(0)  # [L, n]: top-1 here and at every deeper layer
        k = suffix.sum(0)  # layers at the end where it holds
        top1 += hit.sum(1)
        settled = k > 0
        settled_hist += torch.bincount(L - k[settled], minlength=L)  # 0-based settle layer
        n_tokens += int(hit.shape[1])
    if n_tokens == 0:
        return {"answer_tokens": 0}
    n_settled = int(settled_hist.sum())
    layers = torch.arange(1, L + 1, dtype=torch.float64)
    return {
        "answer_tokens": n_tokens,
        "num_layers": L,
        "final_top1_share": round(n_settled / n_tokens, 4),
        "top1_share_by_layer": [round(float(x) / n_tokens, 4) for x in top1],
        "settled_share_by_layer": [round(float(x) / n_tokens, 4) for x in settled_hist.cumsum(0)],
        "settled_histogram": settled_hist.tolist(),
        "settled_layer_mean": round(float((settled_hist.double() * layers).sum()) / n_settled, 3)
        if n_settled
        else None,
    }
