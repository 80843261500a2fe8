"""Advantages, losses and masks against hand-computed numbers."""

import math

import pytest
import torch

from rl.trainer.core_algos import (
    aggregation_weights,
    get_advantage,
    grpo_advantages,
    kl_k3,
    loss_mask,
    masked_aggregate,
    ppo_clip_token_loss,
    serial_group_advantages,
    truncated_is_weights,
)
from rollout.types import ANSWER, EXIT_PROMPT, THINK
from tests.reference_losses import ppo_clip_loss


def test_serial_group_advantages_subtract_the_mean_without_std():
    # decaying rewards of a group: exit1 correct (1), exit2 correct (0.5), exit3 wrong, full correct (0.25)
    assert serial_group_advantages([1.0, 0.5, 0.0, 0.25]) == pytest.approx([0.5625, 0.0625, -0.4375, -0.1875])
    assert serial_group_advantages([]) == []
    assert get_advantage("sgrpo") is serial_group_advantages


def test_grpo_advantages_with_and_without_std():
    assert grpo_advantages([1, 0, 0, 1]) == pytest.approx([1, -1, -1, 1], abs=1e-5)  # mean .5, std .5
    assert grpo_advantages([1, 0, 0, 1], scale_std=False) == pytest.approx([0.5, -0.5, -0.5, 0.5])
    assert grpo_advantages([1, 1, 1]) == [0.0, 0.0, 0.0]  # all-equal group: no signal, no NaN
    with pytest.raises(KeyError, match="registered"):
        get_advantage("nope")


def test_ppo_clip_loss_hand_computed():
    ratio = torch.tensor([[1.5, 1.0], [0.5, 1.1]])
    old = torch.zeros(2, 2)
    logp = torch.log(ratio).requires_grad_()
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 2)
    loss, stats = ppo_clip_loss(logp, old, adv, mask, 0.2, 0.2, "token-mean")
    # row 0 (A=+1): -min(1.5, 1.2) = -1.2, -min(1, 1) = -1 ; row 1 (A=-1): -min(-0.5, -0.8) = 0.8, 1.1
    assert float(loss) == pytest.approx((-1.2 - 1.0 + 0.8 + 1.1) / 4)
    assert stats["clip_frac"] == pytest.approx(0.5)
    loss.backward()
    # clipped tokens get no gradient; d/dlogp of -rho*A is -rho*A / 4 elsewhere
    assert logp.grad.flatten().tolist() == pytest.approx([0.0, -0.25, 0.0, 1.1 / 4])


def test_ppo_clip_loss_respects_mask_and_is_weights():
    logp = torch.zeros(1, 3, requires_grad=True)
    loss, _ = ppo_clip_loss(
        logp,
        torch.zeros(1, 3),
        torch.tensor([2.0]),
        torch.tensor([[1.0, 1.0, 0.0]]),
        is_weights=torch.tensor([[0.5, 1.0, 7.0]]),
    )
    assert float(loss) == pytest.approx(-(0.5 * 2 + 1.0 * 2) / 2)


def test_aggregations():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert float(masked_aggregate(x, m, "token-mean")) == pytest.approx(10 / 4)
    assert float(masked_aggregate(x, m, "seq-mean-token-mean")) == pytest.approx((2 + 4) / 2)
    assert float(masked_aggregate(x, m, "seq-mean-token-sum")) == pytest.approx((6 + 4) / 2)
    with pytest.raises(ValueError, match="aggregation"):
        masked_aggregate(x, m, "bogus")


def test_aggregation_weights_turn_every_aggregation_into_a_plain_sum():
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])

    def close(got, want):
        torch.testing.assert_close(got, torch.tensor(want), atol=1e-7, rtol=0)

    close(aggregation_weights(m, "token-mean"), [[0.25] * 3, [0.25, 0, 0], [0, 0, 0]])
    # two sequences carry tokens: 1/(3*2) each for the first, 1/(1*2) for the second
    close(aggregation_weights(m, "seq-mean-token-mean"), [[1 / 6] * 3, [0.5, 0, 0], [0, 0, 0]])
    close(aggregation_weights(m, "seq-mean-token-sum"), [[1 / 3] * 3, [1 / 3, 0, 0], [0, 0, 0]])
    x = torch.randn(3, 3)
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        assert float((x * aggregation_weights(m, mode)).sum()) == pytest.approx(
            float(masked_aggregate(x, m, mode)), abs=1e-6
        )
    with pytest.raises(ValueError, match="aggregation"):
        aggregation_weights(m, "bogus")


def test_ppo_clip_token_loss_per_token():
    ratio = torch.tensor([1.5, 0.5, 0.9])
    adv = torch.tensor([1.0, -1.0, 2.0])
    got = ppo_clip_token_loss(torch.log(ratio), torch.zeros(3), adv, 0.2, 0.2)
    # min(1.5, 1.2) = 1.2 -> -1.2;  min(-0.5, -0.8) = -0.8 -> 0.8;  min(1.8, 1.8) -> -1.8
    assert got.tolist() == pytest.approx([-1.2, 0.8, -1.8])


def test_kl_k3_and_truncated_is():
    assert float(kl_k3(torch.tensor(0.3), torch.tensor(0.3))) == 0.0
    assert float(kl_k3(torch.tensor(0.0), torch.tensor(math.log(2)))) == pytest.approx(2 - math.log(2) - 1)
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5]]))
    sampler = torch.log(torch.tensor([[0.25, 0.5, 0.9]]))
    w, raw = truncated_is_weights(old, sampler, torch.tensor([[1.0, 1.0, 0.0]]), cap=1.5)
    assert raw.tolist()[0] == pytest.approx([2.0, 1.0, 1.0])  # unsampled (inserted) tokens: 1
    assert w.tolist()[0] == pytest.approx([1.5, 1.0, 1.0])


def test_loss_mask_trains_the_full_rollout_whole_and_the_exit_answer_only():
    regions = [THINK, THINK, EXIT_PROMPT, EXIT_PROMPT, ANSWER, ANSWER]
    assert loss_mask(regions, is_full=False) == [0, 0, 0, 0, 1, 1]
    assert loss_mask([THINK, THINK, ANSWER], is_full=True) == [1, 1, 1]  # the full path always trains


def test_exit_branch_mask_drops_wrong_exits_only_when_asked():
    from rl.trainer.core_algos import exit_branch_mask

    regions = [THINK, THINK, EXIT_PROMPT, ANSWER, ANSWER]
    assert exit_branch_mask(regions, False, "all") == [0, 0, 0, 1, 1]
    assert exit_branch_mask(regions, False, "correct_only") == [0, 0, 0, 0, 0]
    assert exit_branch_mask(regions, True, "correct_only") == [0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="unknown exit_answers"):
        exit_branch_mask(regions, True, "nope")


def test_newline_token_ids_mark_the_line_starts_of_a_real_thought(quick_model_dir):
    from transformers import AutoTokenizer

    from rollout.thinking import newline_token_ids

    tok = AutoTokenizer.from_pretrained(quick_model_dir)
    ids = tok("\n1: +4, 9+4=3\ncheck 1: +4, 9+4=3 ok\n</think>", add_special_tokens=False)["input_ids"]
    newlines = newline_token_ids(tok)
    starts = [t > 0 and ids[t - 1] in newlines for t in range(len(ids))]
    assert [tok.decode(ids[t : t + 1]) for t, f in enumerate(starts) if f] == ["1", "check", "</think>"]
