import json
import time
from collections import Counter

import pytest

from rewards import (
    BatchVerifier,
    BatchVerifierConfig,
    RewardInput,
    correctness_rewards,
    decaying_rewards,
    extract_answer,
    format_penalties,
    get_reward,
    verify_answer,
)


def test_kimi_length_rewards_hand_computed():
    from rewards.reward_functions import REWARDS, RewardInput, kimi_length_rewards

    # lengths 10, 20, 30: lambda = 0.5, 0, -0.5
    assert kimi_length_rewards([True, True, True], [10, 20, 30]) == [1.5, 1.0, 0.5]
    assert kimi_length_rewards([False, False, False], [10, 20, 30]) == [0.0, 0.0, -0.5]  # short and wrong: 0
    assert kimi_length_rewards([True, False], [7, 7]) == [1.0, 0.0]  # equal lengths: no length term
    group = RewardInput(["p"] * 2, ["x" * 4, "x" * 12], ["1", "1"], [{}, {}], [True, True])
    assert REWARDS["kimi_length"](group) == [1.5, 0.5]


def test_decaying_rewards_hand_computed():
    assert decaying_rewards([True, True, True, True]) == [1.0, 0.5, 0.25, 0.125]
    assert decaying_rewards([False, True, False, True, True]) == [0.0, 1.0, 0.0, 0.5, 0.25]
    assert decaying_rewards([False, False]) == [0.0, 0.0]
    assert decaying_rewards([]) == []
    assert correctness_rewards([True, False]) == [1.0, 0.0]
    group = RewardInput(["p"] * 3, ["a", "b", "c"], ["1"] * 3, [{}] * 3, [False, True, True])
    assert get_reward("decaying")(group) == [0.0, 1.0, 0.5]
    assert get_reward("correctness")(group) == [0.0, 1.0, 1.0]
    with pytest.raises(KeyError, match="unknown reward 'nope'"):
        get_reward("nope")


def test_format_penalties():
    assert format_penalties(["<think>a</think>\\boxed{1}", "<think>never closed", "</think> no answer here"]) == [
        0.0,
        -0.5,
        -0.5,
    ]


def test_only_text_after_last_think_counts():
    assert verify_answer("<think>\\boxed{5}</think>\n\nThe answer is \\boxed{7}.", "7")
    assert not verify_answer("<think>maybe \\boxed{7}</think>\n\nThe answer is \\boxed{5}.", "7")
    assert not verify_answer("<think>I think \\boxed{7} but", "7")  # thinking never closed: no answer
    assert extract_answer("</think> so \\boxed{\\frac{1}{2}} and then \\boxed{3}") == "3"
    assert extract_answer("The answer is 42.") == "42"


@pytest.mark.parametrize(
    "pred,gold,ok",
    [
        ("\\boxed{1,234}", "1234", True),
        ("\\boxed{0.5}", "\\frac{1}{2}", True),
        ("\\boxed{1/2}", "\\frac12", True),
        ("\\boxed{50\\%}", "50", True),
        ("\\boxed{90^\\circ}", "90^\\circ", True),
        ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", True),
        ("\\boxed{2\\pi}", "2\\pi", True),
        ("\\boxed{\\{1,2,3\\}}", "\\{3,2,1\\}", True),
        ("\\boxed{(1, 2]}", "(1,2]", True),
        ("\\boxed{x = 3}", "3", True),
        ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", True),
        ("The answer is \\boxed{C}", "C", True),
        ("\\boxed{B}", "C", False),
        ("\\boxed{7}", "8", False),
    ],
)
def test_answer_kinds(pred, gold, ok):
    assert verify_answer(pred, gold) is ok


def test_conformance_with_peer_suites(shared_dir):
    cases = [json.loads(line) for line in (shared_dir / "equivalence" / "cases.jsonl").open()]
    misses = Counter()
    agree = 0
    for c in cases:
        mc = True if (c.get("settings") or {}).get("match", "").startswith("letter") else None
        if verify_answer(c["pred"], c["gold"], multiple_choice=mc) == c["equal"]:
            agree += 1
        else:
            misses.update(c["category"] or ["uncategorised"])
    rate = agree / len(cases)
    print(f"conformance {agree}/{len(cases)} = {rate:.4f}; misses by category: {dict(misses)}")
    assert len(cases) == 290
    assert rate >= 0.97


def test_every_benchmark_gold_verifies_against_itself(shared_dir):
    golds = []
    for f in sorted((shared_dir / "benchmarks").glob("*.jsonl")):
        golds += [json.loads(line)["answer"] for line in f.open()]
    with BatchVerifier(BatchVerifierConfig(workers=2, timeout_s=10)) as bv:
        verdicts = bv.verify([f"\\boxed{{{g}}}" for g in golds], golds)
    failed = [g for g, v in zip(golds, verdicts) if not v]
    assert not failed, failed[:10]


BAD_INPUTS = [
    "",
    "x" * 200_000,
    "\\boxed{" * 4000,
    "}" * 5000 + "\\boxed{1",
    "\\boxed{" + "{" * 3000 + "1" + "}" * 3000 + "}",
    "\\boxed{9^{9^{9^{9^{9^{9^{9}}}}}}}",
    "\\boxed{1000000000!}",
    "\\boxed{(10^{10^{10}})!}",
    "a\x00b\ud800\udfff \\boxed{\x00}",
    "\\boxed{__import__('os').system('touch /tmp/exitrl_pwned')}",
    "\\boxed{exec(\"open('/tmp/exitrl_pwned','w')\")}",
    "</think>" * 1000,
]


def test_bad_input_is_bounded_and_harmless(tmp_path):
    import os

    with BatchVerifier(BatchVerifierConfig(workers=2, timeout_s=3)) as bv:
        t0 = time.monotonic()
        verdicts = bv.verify(BAD_INPUTS, ["42"] * len(BAD_INPUTS))
        wall = time.monotonic() - t0
    assert verdicts == [False] * len(BAD_INPUTS)
    # every item is bounded: worst case all hit the bound, two at a time (+ worker restarts)
    assert wall < 3 * len(BAD_INPUTS) / 2 + 30
    assert not os.path.exists("/tmp/exitrl_pwned")


def test_direct_call_never_raises():
    for bad in BAD_INPUTS[:5] + BAD_INPUTS[8:]:
        assert verify_answer(bad, "42") is False


def test_batch_verifier_survives_crash_and_hang(monkeypatch):
    with BatchVerifier(BatchVerifierConfig(workers=2, timeout_s=2)) as bv:
        # kill one worker from outside mid-batch: its item is False, the rest still verified
        assert bv.verify(["\\boxed{1}", "\\boxed{2}"], ["1", "2"]) == [True, True]
        bv._workers[0].proc.kill()
        res = bv.verify(["\\boxed{1}"] * 6, ["1"] * 6)
        assert res.count(True) >= 5
        assert bv.verify(["\\boxed{3}"], ["3"]) == [True]
