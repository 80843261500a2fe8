import re

import pytest

from rewards.verify import verify_answer
from rl.data.synthetic_task import TaskConfig, apply_op, forced_exit_completion, generate_problems
from rollout.thinking import DEFAULT_EXIT_PROMPT


def test_generator_is_deterministic_and_seeded():
    a = generate_problems(50, seed=3)
    assert a == generate_problems(50, seed=3)
    assert a != generate_problems(50, seed=4)


def test_every_trace_boxes_the_true_answer():
    for p in generate_problems(500, seed=1):
        v = p.start
        for op, x in p.ops:
            v = apply_op(v, op, x)
        assert p.answer == str(v)
        assert re.findall(r"\\boxed\{(\d)\}", p.completion()) == [str(v)]
        assert verify_answer(p.completion(), p.answer)


def test_difficulty_range_and_redundancy():
    probs = generate_problems(2000, seed=2, config=TaskConfig(min_ops=2, max_ops=6))
    assert {p.difficulty for p in probs} == {2, 3, 4, 5, 6}
    redundant = sum(len(p.thinking()) - p.computation_chars() for p in probs)
    assert redundant / sum(len(p.thinking()) for p in probs) >= 0.5  # at least half is re-checking


def test_forced_exit_answers_what_is_known():
    p = generate_problems(1, seed=5, config=TaskConfig(min_ops=4, max_ops=4))[0]
    full = forced_exit_completion(p, p.computation_chars())
    assert DEFAULT_EXIT_PROMPT in full and full.endswith(f"\\boxed{{{p.answer}}}.")
    first_line = len("\n" + p.step_lines()[0] + "\n")
    early = forced_exit_completion(p, first_line)
    assert early.endswith(f"\\boxed{{{p.values()[0]}}}.")


def test_heldout_sets_share_no_content_with_any_training_label_or_validation_pool():
    """Every held-out set (the demo's 1000 problems, the trainer's validation set) is disjoint by
    content from the SFT pool, the RL stream and the router-label stream: problems repeat across
    seed streams (6,760 two-step problems), so seeds alone do not keep them apart."""
    from rl.data.problems import DataConfig, load_problems
    from rl.data.synthetic_task import (
        SFT_SEED_OFFSET,
        heldout_problems,
        rl_train_problems,
        router_label_problems,
        validation_problems,
    )
    from rl.models.tiny_reasoner import TinyModelRecipe

    recipe = TinyModelRecipe()

    def contents(problems):
        return {p.problem for p in problems}

    heldout = contents(heldout_problems(1000))
    validation = contents(load_problems(DataConfig(source="synthetic", split="validation", limit=500)))
    assert validation == contents(validation_problems(500))
    train_pools = {
        "sft": contents(generate_problems(recipe.train_problems, seed=SFT_SEED_OFFSET + recipe.seed, prefix="train")),
        "rl": contents(rl_train_problems(20000)),
        "router labels": contents(router_label_problems(2000)),
        "validation": validation,
    }
    for name, pool in train_pools.items():
        assert not heldout & pool, f"{len(heldout & pool)} held-out problems are in the {name} pool"
        if name != "validation":
            assert not validation & pool, f"{len(validation & pool)} validation problems are in the {name} pool"
    # the split is by content: a seed-only held-out stream overlaps the SFT pool (what this replaced)
    seed_only = contents(generate_problems(1000, seed=7, split="train"))
    assert seed_only & train_pools["sft"]
    # and every difficulty is still held out, in near-equal shares
    difficulties = [p.difficulty for p in heldout_problems(1000)]
    assert {d: difficulties.count(d) for d in range(2, 7)} == pytest.approx({d: 200 for d in range(2, 7)}, abs=40)


def test_recheck_variant_opens_with_a_true_first_pass_and_forced_exits_answer_the_latest_value():
    from rl.data.synthetic_task import TASKS
    from rl.models.tiny_reasoner import TinyModelRecipe, sft_examples

    plain = generate_problems(50, seed=11)
    recheck = generate_problems(50, seed=11, config=TASKS["recheck"])
    assert [p.problem for p in plain] == [p.problem for p in recheck]  # the same problems, other traces
    p = next(q for q in recheck if q.difficulty == 4)
    lines = p.thinking().split("\n")
    assert lines[1] == f"first pass: {p.answer}" and lines[2:6] == p.step_lines()  # never a wrong first pass
    after_first = len("\n" + lines[1] + "\n")
    assert forced_exit_completion(p, after_first).endswith(f"\\boxed{{{p.answer}}}.")
    after_step_2 = len("\n".join(lines[:4]) + "\n")
    assert forced_exit_completion(p, after_step_2).endswith(f"\\boxed{{{p.values()[1]}}}.")  # the latest value
    assert p.computation_chars() == len("\n".join(lines[:6]) + "\n")
    assert all("first pass" not in q.thinking() for q in plain)
    assert any(
        c.startswith("<think>\nfirst pass: ")
        for _, c in sft_examples(TinyModelRecipe(task="recheck", train_problems=20))
    )
    with pytest.raises(ValueError, match="unknown task"):
        sft_examples(TinyModelRecipe(task="bogus", train_problems=2))
    assert TinyModelRecipe(task="recheck").digest() != TinyModelRecipe().digest()


def test_wrong_first_passes_are_context_never_targets():
    """The recheck task's SFT shows some traces a wrong first pass that the re-check overrules; the
    wrong value's tokens are left out of the loss, so the model is only trained to write true ones."""
    from rl.data.synthetic_task import untrained_spans
    from rl.models.tiny_reasoner import TinyModelRecipe, _encode_examples, sft_examples, train_tokenizer

    examples = sft_examples(TinyModelRecipe(task="recheck", train_problems=200))
    wrong = [c for _, c in examples if untrained_spans(c)]
    assert 0.2 < len(wrong) / len(examples) < 0.6
    for c in wrong:
        (s, e), boxed = untrained_spans(c)[0], c.rsplit("\\boxed{", 1)[1][0]
        steps = c.split("\n")[2:]
        last_step = [line for line in steps if line[:1].isdigit()][-1]
        assert c[s:e] != boxed and last_step.endswith(f"={boxed}")  # the re-check ends on the true answer
    assert not any(untrained_spans(c) for _, c in sft_examples(TinyModelRecipe(train_problems=50)))
    tok = train_tokenizer(TinyModelRecipe(), [c for _, c in examples] + [p for p, _ in examples])
    for (ids, _, masked), (_, c) in zip(_encode_examples(tok, examples), examples):
        spans = untrained_spans(c)
        if spans:
            s, e = spans[0]
            assert len(masked) == 1 and c[s:e] in tok.decode([ids[masked[0]]])
        else:
            assert masked == []
