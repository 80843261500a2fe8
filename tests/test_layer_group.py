"""The layer-level serial group of joint training: rewards, advantages and the router loss by hand,
and sampled plans whose recorded log-probs are the routers' own."""

from __future__ import annotations

import pytest
import torch

from rl.trainer.layer_group import (
    LayerGroup,
    LayerGroupConfig,
    accuracy_constrained_rewards,
    action_logprobs,
    compute_decaying_rewards,
    dual_step,
    get_layer_reward,
    layer_advantages,
    plan_agreement,
    router_logits_under_plans,
    router_ppo_loss,
    router_update_loss,
    sample_layer_group,
    variant_correct,
)


def test_compute_decaying_rewards_by_hand():
    # executed 5, 8, 3, 5, 6; correct T, T, F, T, T -> correct levels {5, 6, 8}: 1, 0.5, 0.25
    got = compute_decaying_rewards([True, True, False, True, True], [5, 8, 3, 5, 6])
    assert got == [1.0, 0.25, 0.0, 1.0, 0.5]
    assert compute_decaying_rewards([False, False], [4, 8]) == [0.0, 0.0]


def test_accuracy_constrained_rewards_by_hand():
    # L = 8, mu = 1: correct variants earn 1 + (8 - e) / 8; the wrong one 0 whatever it skipped
    got = accuracy_constrained_rewards([True, True, False, True], [5, 8, 3, 10], num_layers=8, multiplier=1.0)
    assert got == [1.375, 1.0, 0.0, 0.75]  # a repeat (10 passes) costs
    assert get_layer_reward("accuracy_constrained") is accuracy_constrained_rewards


def test_dual_ascent_prices_accuracy_until_a_lossy_plan_stops_paying():
    """A plan that saves half the layers but is wrong on 20 % of the problems, against the all-execute
    plan, always right: at mu = 1 the lossy plan earns more (0.8 x 1.5 = 1.2 > 1) - a layer bought
    with accuracy. Dual ascent on the gap (0.2 over the bound 0.02, step 2: +0.36 a step) raises mu
    to 2.08 in three steps, where the lossy plan's expected advantage over the full one turns negative."""
    mu, history = 1.0, []
    for _ in range(3):
        lossy = 0.8 * accuracy_constrained_rewards([True], [4], num_layers=8, multiplier=mu)[0]
        full = accuracy_constrained_rewards([True], [8], num_layers=8, multiplier=mu)[0]
        history.append(lossy - full)
        mu = dual_step(mu, 0.2 - 0.02, 2.0)
    assert history[0] == pytest.approx(0.2)  # mu = 1: the lossy plan pays
    assert mu == pytest.approx(2.08)
    assert 0.8 * (mu + 0.5) - mu == pytest.approx(-0.016)  # now it does not
    # a plan within the bound keeps paying, and mu falls back while the gap is under it (never below 0)
    assert 0.99 * (mu + 0.5) > mu
    assert dual_step(0.01, 0.0 - 0.02, 2.0) == 0.0


def test_variant_correct_needs_the_answer_and_the_agreement():
    answered = torch.tensor([[True, True, False, True]])
    agree = torch.tensor([[1.0, 0.75, 1.0, 0.9]])
    assert variant_correct(answered, agree, 0.9).tolist() == [[True, False, False, True]]
    assert variant_correct(answered, agree, 0.0).tolist() == answered.tolist()  # 0: the answer alone


def test_layer_rewards_are_registered_by_name():
    assert get_layer_reward("compute_decaying") is compute_decaying_rewards
    with pytest.raises(KeyError, match="unknown layer reward 'nope'"):
        get_layer_reward("nope")


def test_layer_advantages_center_within_the_variants():
    adv = layer_advantages(torch.tensor([[1.0, 0.5, 0.0, 0.5], [0.0, 0.0, 0.0, 0.0]]))
    assert torch.equal(adv, torch.tensor([[0.5, 0.0, -0.5, 0.0], [0.0, 0.0, 0.0, 0.0]]))


def test_router_ppo_loss_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.9], [0.2, 0.5]]))
    old = torch.log(torch.tensor([[0.25, 0.9], [0.4, 0.5]]))  # ratios 2, 1 / 0.5, 1
    adv = torch.tensor([1.0, -1.0])
    ent = torch.tensor([[0.1, 0.3], [0.5, 0.7]])
    # clip 0.2: row 0: min(2, 1.2) = 1.2 and 1; row 1 (A = -1): min(-0.5, -0.8) = -0.8 and -1
    want = -(1.2 + 1.0 - 0.8 - 1.0) / 4 - 0.1 * 0.4
    got = router_ppo_loss(logp, old, adv, ent, clip=0.2, entropy_coef=0.1)
    assert abs(float(got) - want) < 1e-6


@pytest.fixture(scope="module")
def routed_quick(quick_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollout.routing.routed_model import RoutedModel
    from rollout.routing.routers import LayerRouters, RouterConfig

    model = AutoModelForCausalLM.from_pretrained(quick_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(quick_model_dir)
    torch.manual_seed(0)
    routers = LayerRouters(
        RouterConfig(num_layers=model.config.num_hidden_layers, hidden_size=model.config.hidden_size)
    )
    with torch.no_grad():
        routers.w2.mul_(5)  # plans that depend on the prompt
    return RoutedModel(model, routers), tok


def test_sampled_plans_carry_the_routers_log_probs_and_all_execute_last(routed_quick):
    routed, tok = routed_quick
    prompts = [tok(t)["input_ids"] for t in ("Start at 3. Apply in order: 1: +5", "Start at 9. Work modulo 10.")]
    thinking = [tok(" 3 + 5 = 8")["input_ids"], tok(" 9")["input_ids"]]
    exit_ids = tok("\n</think>\n\n")["input_ids"]
    cfg = LayerGroupConfig(enabled=True, variants=4, temperature=1.5, answer_max_tokens=3)
    g = sample_layer_group(
        routed, prompts, thinking, exit_ids, cfg, eos_ids={tok.eos_token_id}, pad_id=0, answer_temperature=0.0, seed=7
    )
    B, K, L = g.plans.shape
    assert (B, K, L) == (2, 4, routed.num_layers)
    assert bool((g.plans[:, -1] == 1).all())
    assert len({tuple(p) for p in g.plans[:, :-1].reshape(-1, L).tolist()}) > 1  # sampling does vary plans
    # the recorded log-probs are log softmax(z / tau) of the deciding prefill's logits under the plan
    from rollout.routing.routed_generation import left_pad

    gen = torch.Generator().manual_seed(7)
    ids, attn = left_pad(prompts, 0, "cpu")
    with torch.no_grad():
        first = routed(ids, attn, temperature=1.5, generator=gen, logits_to_keep=1, lm_head=False)
    assert torch.equal(first.plan, g.plans[:, 0])
    want = torch.log_softmax(first.router_logits / 1.5, -1).gather(-1, first.plan[..., None]).squeeze(-1)
    torch.testing.assert_close(g.old_logp[:, 0], want, atol=1e-5, rtol=1e-5)
    assert all(1 <= len(a) <= 3 for a in g.answers[0]) and len(g.answers[0]) == 4
    assert g.prefixes[0] == prompts[0] + thinking[0] + exit_ids


def test_router_update_raises_the_log_prob_of_plans_with_positive_advantage(routed_quick):
    routed, tok = routed_quick
    prompts = [tok("Start at 4. Apply in order: 1: *2")["input_ids"]]
    cfg = LayerGroupConfig(enabled=True, variants=2, temperature=1.0, entropy_coef=0.0)
    L = routed.num_layers
    good, bad = [1, 0] + [1] * (L - 2), [0] + [1] * (L - 1)
    plans = torch.tensor([[good, bad]])  # [1, 2, L]
    logits = router_logits_under_plans(routed, prompts * 2, plans[0], 0)
    old, _ = action_logprobs(logits.detach(), plans[0], 1.0)

    g = LayerGroup(plans, old.reshape(1, 2, L), prompts, prefixes=[], answers=[], answer_logprobs=[])
    adv = torch.tensor([[1.0, -1.0]])
    loss, stats = router_update_loss(routed, g, adv, cfg, 0)
    assert abs(stats["layers/router_clip_frac"]) < 1e-9  # ratios 1 before the step
    opt = torch.optim.SGD(routed.routers.parameters(), lr=0.5)
    opt.zero_grad()
    loss.backward()
    assert float(routed.routers.w1.grad.abs().max()) > 0
    saved = [p.detach().clone() for p in routed.routers.parameters()]
    opt.step()
    with torch.no_grad():
        new, _ = action_logprobs(router_logits_under_plans(routed, prompts * 2, plans[0], 0), plans[0], 1.0)
        for p, s in zip(routed.routers.parameters(), saved):
            p.copy_(s)  # the module-scoped routers stay as they were
    assert float(new[0].sum()) > float(old[0].sum())  # the good plan more likely
    assert float(new[1].sum()) < float(old[1].sum())  # the bad one less


def test_plan_agreement_against_full_logits_by_hand(routed_quick):
    """agree[b, k] = share of thinking positions whose argmax under plan k equals the all-execute
    argmax, checked against full [T, V] logits of separate forwards; the all-execute variant agrees
    with itself, a plan skipping most layers does not."""
    from rollout.routing.routed_generation import left_pad

    routed, tok = routed_quick
    L = routed.num_layers
    prompts = [tok(t)["input_ids"] for t in ("Start at 3. Apply in order: 1: +5", "Start at 9. Work modulo 10.")]
    thinking = [tok(" 3 + 5 = 8 , 8 mod 10 = 8")["input_ids"], []]
    plans = torch.tensor([[[0] * (L - 1) + [1], [1] * L, [1] * L], [[0] * L, [2] * L, [1] * L]])  # [B=2, K=3, L]
    agree = plan_agreement(routed, prompts, thinking, plans, pad_id=0)
    n, m = len(prompts[0]), len(thinking[0])
    ids, attn = left_pad([prompts[0] + thinking[0]], 0, "cpu")
    with torch.no_grad():
        args = [routed(ids, attn, plan=plans[0, k][None]).logits[0, n - 1 : n + m - 1].argmax(-1) for k in range(3)]
    want = (args[0] == args[2]).float().mean()
    assert abs(float(agree[0, 0]) - float(want)) < 1e-6
    assert float(agree[0, 0]) < 1.0  # the case happens: skipping all but the last layer changes the argmax
    assert float(agree[0, 1]) == 1.0 == float(agree[0, 2])  # plans 1 and 2 are the same all-execute plan
    assert agree[1].tolist() == [1.0, 1.0, 1.0]  # no thinking: nothing to disagree on


def test_variant_answers_are_a_loss_term_of_their_own():
    """The variants' token weights turn the step's token-mean into
    (serial token-mean + coef * mean over prompts of each prompt's variant token-mean) / (1 + coef),
    whatever their token counts: checked on a per-token loss against that formula by hand."""
    from rl.trainer.core_algos import aggregation_weights
    from rl.trainer.layer_stage import LayerRollout, variant_learner_batch

    B, K, L = 2, 3, 4
    answers = [[[1] * 2, [1] * 6, [1] * 3], [[1] * 10, [1] * 1, [1] * 4]]
    group = LayerGroup(
        plans=torch.ones(B, K, L, dtype=torch.long),
        old_logp=torch.zeros(B, K, L),
        prompts=[[5], [6]],
        prefixes=[[5, 7], [6, 7]],
        answers=answers,
        answer_logprobs=[[[0.0] * len(a) for a in row] for row in answers],
    )
    adv = torch.tensor([[0.5, -0.5, 0.0], [1.0, 0.0, -1.0]])  # zero-advantage variants stay out
    lb = variant_learner_batch(LayerRollout(group, adv, {}), serial_tokens=40, coef=0.25)
    assert [len(m) for m in lb.mask] == [2, 6, 10, 4]
    serial_loss = torch.arange(40, dtype=torch.float) / 10  # a serial token-mean of 1.95
    variant_loss = [torch.full((n,), v) for n, v in zip([2, 6, 10, 4], [1.0, 3.0, 2.0, 5.0])]
    mask = torch.cat([torch.ones(40)] + [torch.tensor(m) for m in lb.mask])
    w = aggregation_weights(mask[None], "token-mean")[0]
    got = float((w * torch.cat([serial_loss, *variant_loss])).sum())
    prompt0 = (2 * 1.0 + 6 * 3.0) / 8  # 2.5
    prompt1 = (10 * 2.0 + 4 * 5.0) / 14  # 40 / 14
    want = (1.95 + 0.25 * (prompt0 + prompt1) / 2) / 1.25
    assert got == pytest.approx(want, rel=1e-6)
