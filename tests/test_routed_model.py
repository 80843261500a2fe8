"""The routed model: per-row layer plans, KV-consistent cached decoding, masked == grouped."""

from __future__ import annotations

import pytest
import torch

from rollout.routing.routed_generation import left_pad, process_logits, routed_generate
from rollout.routing.routed_model import RoutedModel
from rollout.routing.routers import LayerRouters, RouterConfig, window_means

L = 6


@pytest.fixture(scope="module")
def model():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=L,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    m = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than the init: layers must matter for the tests to bite
        for p in m.model.layers.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    return m


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30, 31, 32, 33, 34], [40, 41, 42, 43]]
PLANS = torch.tensor(
    [
        [1, 1, 1, 1, 1, 1],
        [0, 1, 2, 1, 0, 1],  # skips layer 0: positions never come from a cache length
        [1, 0, 0, 1, 2, 1],
        [1, 2, 1, 1, 1, 0],
    ]
)


def _gen(routed, prompts, plans, n=12, **kw):
    return routed_generate(routed, prompts, max_tokens=n, eos_ids={-1}, pad_id=0, plans=plans, **kw)


def test_all_execute_plan_equals_the_plain_model(model):
    ids, attn = left_pad(PROMPTS, 0, "cpu")
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits
        for mode in ("grouped", "masked"):
            got = RoutedModel(model, mode=mode)(ids, attn, plan=torch.ones(len(PROMPTS), L, dtype=torch.long)).logits
            real = attn.bool()
            assert torch.allclose(got[real], ref[real], atol=1e-4), mode


def test_skipping_a_layer_changes_the_logits(model):
    """Guards the tests below: a plan must matter, or equalities between plans prove nothing."""
    ids, attn = left_pad(PROMPTS[:1], 0, "cpu")
    routed = RoutedModel(model)
    with torch.no_grad():
        full = routed(ids, attn, plan=torch.ones(1, L, dtype=torch.long)).logits
        skip = routed(ids, attn, plan=PLANS[1:2]).logits
        rep = routed(ids, attn, plan=PLANS[3:4]).logits
    assert (full - skip).abs().max() > 0.1 and (full - rep).abs().max() > 0.1


def test_cached_generation_equals_recomputation_under_the_plan(model):
    routed = RoutedModel(model, mode="grouped")
    rows = _gen(routed, PROMPTS, PLANS)
    for r, row in enumerate(rows):
        seq = PROMPTS[r] + row.tokens
        ids, attn = left_pad([seq], 0, "cpu")
        with torch.no_grad():
            logits = routed(ids, attn, plan=PLANS[r : r + 1]).logits[0]
        n = len(PROMPTS[r])
        pred = logits[n - 1 : -1].argmax(-1).tolist()
        assert pred == row.tokens, r
        ref_lp = torch.log_softmax(logits[n - 1 : -1], -1).gather(1, torch.tensor(row.tokens)[:, None]).squeeze(1)
        assert torch.allclose(ref_lp, torch.tensor(row.logprobs), atol=1e-4)


def test_masked_equals_grouped(model):
    grouped = _gen(RoutedModel(model, mode="grouped"), PROMPTS, PLANS)
    masked = _gen(RoutedModel(model, mode="masked"), PROMPTS, PLANS)
    for g, m in zip(grouped, masked):
        assert g.tokens == m.tokens
        assert max(abs(a - b) for a, b in zip(g.logprobs, m.logprobs)) < 1e-4


def test_mixed_plan_batch_equals_each_row_alone(model):
    routed = RoutedModel(model, mode="grouped")
    batch = _gen(routed, PROMPTS, PLANS)
    distinct = {tuple(r.tokens) for r in batch}
    assert len(distinct) == len(PROMPTS)
    for r in range(len(PROMPTS)):
        alone = _gen(routed, [PROMPTS[r]], PLANS[r : r + 1])[0]
        assert alone.tokens == batch[r].tokens, r
        assert max(abs(a - b) for a, b in zip(alone.logprobs, batch[r].logprobs)) < 1e-4


def test_routers_decide_at_prefill_and_the_plan_stays(model):
    torch.manual_seed(1)
    routers = LayerRouters(RouterConfig(num_layers=L, hidden_size=64))
    with torch.no_grad():
        routers.b2.copy_(torch.tensor([[2.0, 0.0, 0.0]] * 3 + [[0.0, 0.0, 2.0]] * 3))  # skip 0-2, repeat 3-5
    routed = RoutedModel(model, routers=routers, mode="grouped")
    rows = _gen(routed, PROMPTS, None)
    plans = torch.tensor([r.plan for r in rows])
    assert plans[:, :3].eq(0).all() and plans[:, 3:].eq(2).all()
    fixed = _gen(RoutedModel(model, mode="grouped"), PROMPTS, plans)  # the same plan given = the same tokens
    assert [r.tokens for r in rows] == [r.tokens for r in fixed]
    # a skip bias large enough flips every decision to skip
    biased = _gen(routed, PROMPTS, None, n=2, skip_bias=100.0)
    assert all(r.plan == [0] * L for r in biased)


def test_route_lens_limit_what_routers_read(model):
    """Routers read the first route_len tokens: a prompt extended by thinking gets the prompt's plan."""
    torch.manual_seed(2)
    routers = LayerRouters(RouterConfig(num_layers=L, hidden_size=64))
    routed = RoutedModel(model, routers=routers)
    base = PROMPTS[0]
    longer = base + [50, 51, 52, 53, 54, 55]
    ids, attn = left_pad([base], 0, "cpu")
    plan_base = routed.forward(ids, attn, logits_to_keep=1, skip_bias=0.0).plan
    rows = routed_generate(routed, [longer], max_tokens=1, eos_ids={-1}, pad_id=0, route_lens=[len(base)])
    assert rows[0].plan == plan_base[0].tolist()


def test_window_means_mask_padding():
    h = torch.arange(2 * 5 * 1, dtype=torch.float).reshape(2, 5, 1)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    means, valid = window_means(h, mask, 2)
    # row 0: real tokens 2,3,4 -> windows {2} (rank 0*2//3=0), {3,4} (ranks 1,2 -> 0, 1)
    # rank*w//n: rank0 -> 0, rank1 -> 2//3 = 0, rank2 -> 4//3 = 1: windows {2,3}, {4}
    assert means[0, :, 0].tolist() == [2.5, 4.0]
    # row 1: ranks 0..4, w=2, n=5: 0,0,0,1,1 -> windows {5,6,7}, {8,9}
    assert means[1, :, 0].tolist() == [6.0, 8.5]
    assert valid.all()
    _, few = window_means(h, torch.tensor([[0, 0, 0, 0, 1], [1, 1, 1, 1, 1]]), 3)
    assert few[0].tolist() == [True, False, False]


def test_top_p_keeps_the_nucleus():
    z = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = process_logits(z, 1.0, 0.8).isfinite()
    assert kept.tolist() == [[True, True, False, False]]


def test_exit_head_readout_equals_the_lm_head_on_every_layer(model):
    """The routed model's exit head (final norm + LM head, statistics only) on each layer's output
    equals norm -> lm_head -> log_softmax of that output; the last layer's equals the model's logits."""
    routed = RoutedModel(model)
    ids, attn = left_pad(PROMPTS, 0, "cpu")
    out = routed(ids, attn, output_layer_inputs=True, lm_head=False)
    assert out.logits is None
    outputs = torch.stack(out.layer_inputs[1:] + [out.hidden])  # [L, B, T, d]: each layer's output
    S, B, T, d = outputs.shape
    targets = ids.reshape(-1)
    read = routed.readout(outputs.reshape(S, B * T, d), targets)
    logp = torch.log_softmax(model.lm_head(model.model.norm(outputs)).float(), -1).reshape(S, B * T, -1)
    torch.testing.assert_close(read.max_logp, logp.max(-1).values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        read.target_logp, logp.gather(-1, targets.expand(S, -1)[..., None])[..., 0], atol=1e-5, rtol=1e-5
    )
    assert float((read.argmax == logp.argmax(-1)).float().mean()) == 1.0
    final = model(input_ids=ids, attention_mask=attn).logits.reshape(B * T, -1)
    real = attn.reshape(-1).bool()  # padding positions differ from the plain model by design
    torch.testing.assert_close(read.lse[-1][real], torch.logsumexp(final.float(), -1)[real], atol=1e-4, rtol=1e-5)
    assert len({tuple(a.tolist()) for a in read.argmax}) > 1  # the layers' read-outs differ
