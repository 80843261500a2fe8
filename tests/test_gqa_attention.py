"""``kernels.gqa_attention``: grouped KV heads kept grouped on CPU give transformers' sdpa outputs
bit for bit (padded batch, prefill and cached decode) and the same gradients."""

import torch


def test_sdpa_gqa_equals_sdpa_forward_decode_and_gradients(quick_model_dir):
    from transformers import AutoModelForCausalLM, DynamicCache

    from kernels.gqa_attention import register

    plain = AutoModelForCausalLM.from_pretrained(str(quick_model_dir), attn_implementation="sdpa")
    gqa = AutoModelForCausalLM.from_pretrained(str(quick_model_dir), attn_implementation=register())
    assert plain.config.num_key_value_heads < plain.config.num_attention_heads  # grouped heads: the case
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, plain.config.vocab_size, (3, 12), generator=g)
    attn = torch.ones_like(ids)
    attn[0, :4] = 0  # left padding
    attn[2, :7] = 0
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    outs = []
    for m in (plain, gqa):
        cache = DynamicCache(config=m.config)
        with torch.no_grad():
            pre = m(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=cache).logits
            a2 = torch.cat([attn, torch.ones(3, 1, dtype=attn.dtype)], 1)
            dec = m(
                input_ids=ids[:, -1:], attention_mask=a2, position_ids=pos[:, -1:] + 1, past_key_values=cache
            ).logits
        m.zero_grad()
        m(input_ids=ids, attention_mask=attn, position_ids=pos).logits[attn.bool()].logsumexp(-1).sum().backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        outs.append((pre, dec, grads))
    (p0, d0, g0), (p1, d1, g1) = outs
    assert torch.equal(p0, p1) and torch.equal(d0, d1)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-6, msg=n)
