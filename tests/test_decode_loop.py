"""The HF backend's sampling loop against ``model.generate``: the same tokens, draw for draw, and the
same log-probs of the processed distribution, with and without finished rows leaving the batch."""

import pytest
import torch


def _batch(quick_model_dir, n_prompts=6, n=4):
    from rl.data.prompts import build_prompt
    from rl.data.synthetic_task import heldout_problems
    from rollout.backends.hf import HFBackend

    be = HFBackend.from_pretrained(str(quick_model_dir))
    tok = be.tokenizer
    prompts = [
        tok(build_prompt(tok, p.problem), add_special_tokens=False)["input_ids"] for p in heldout_problems(n_prompts)
    ]
    ids, attn = be._left_pad([p for p in prompts for _ in range(n)])
    return be, ids, attn


def _force_eos(eos: int):
    """Rows 0 and 1 of every 4 end at steps 5 and 20 (so rows leave the batch in every case)."""

    def force(step, rows, scores):
        for k, at in ((0, 5), (1, 20)):
            if step == at:
                hit = rows % 4 == k
                scores[hit] = -float("inf")
                scores[hit, eos] = 0.0
        return scores

    return force


def _hf_rows(be, ids, attn, max_tokens, temperature, top_p, force):
    from transformers import LogitsProcessorList

    greedy = temperature == 0
    width, rows_all = ids.shape[1], torch.arange(ids.shape[0])
    res = be.model.generate(
        logits_processor=LogitsProcessorList([lambda x, s: force(x.shape[1] - width, rows_all, s)]),
        input_ids=ids,
        attention_mask=attn,
        max_new_tokens=max_tokens,
        do_sample=not greedy,
        temperature=None if greedy else temperature,
        top_p=None if greedy else top_p,
        top_k=None,
        pad_token_id=be.pad_id,
        eos_token_id=sorted(be.eos_ids),
        output_scores=True,
        return_dict_in_generate=True,
    )
    seqs = res.sequences[:, ids.shape[1] :]
    logps = torch.stack([torch.log_softmax(s.float(), -1) for s in res.scores], 1)
    rows = []
    for r in range(seqs.shape[0]):
        toks, lps = [], []
        for t, tok in enumerate(seqs[r].tolist()):
            toks.append(tok)
            lps.append(float(logps[r, t, tok]))
            if tok in be.eos_ids:
                break
        rows.append((toks, lps))
    return rows


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (0.0, 1.0)])
def test_decode_matches_generate_draw_for_draw(quick_model_dir, temperature, top_p):
    from rollout.backends.decode_loop import decode

    be, ids, attn = _batch(quick_model_dir)
    max_tokens, force = 64, _force_eos(min(be.eos_ids))
    torch.manual_seed(11)
    with torch.no_grad():
        ref = _hf_rows(be, ids, attn, max_tokens, temperature, top_p, force)
    lens = sorted(len(t) for t, _ in ref)
    # make the case happen: a quarter of the rows finish before the last one, so rows leave the batch
    assert lens[len(lens) // 4] < lens[-1]
    for compact_at, tol in ((2.0, 0.0), (0.25, 1e-4)):  # never / from a quarter finished
        torch.manual_seed(11)
        rows = decode(
            be.model,
            ids,
            attn,
            max_tokens=max_tokens,
            eos_ids=be.eos_ids,
            temperature=temperature,
            top_p=top_p,
            compact_at=compact_at,
            logits_processor=force,
        )
        assert [r.tokens for r in rows] == [t for t, _ in ref]
        for r, (t, lp) in zip(rows, ref):
            assert r.finish == ("stop" if t[-1] in be.eos_ids else "length")
            assert max(abs(a - b) for a, b in zip(r.logprobs, lp)) <= tol
