import re

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
