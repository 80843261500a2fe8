"""The exit oracle: cuts at every line break of the greedy chain, the earliest correct one kept."""

from rl.evaluation.oracle import exit_oracle, line_break_cuts


def test_line_break_cuts_are_thinking_lengths_after_each_newline():
    nl = frozenset({9})
    #      0  1  2  3  4  5  6  7  8     thinking = [1:7]
    ids = [5, 9, 3, 4, 9, 6, 9, 9, 2]
    assert line_break_cuts(ids, 1, 7, nl) == [1, 4, 6]  # the 9 at index 7 is past the thinking


def test_oracle_keeps_the_earliest_correct_exit_else_the_full_chain(quick_model_dir):
    """A verifier that calls an answer right when its text goes on from the chain's thinking up to the
    chain's second line break: the oracle is then that cut (computed here from the chain itself), or
    the full chain's thinking where the chain has fewer line breaks; a verifier that is never right
    gives the full chains' length."""
    from rl.data.problems import DataConfig, Problem, encode_prompts, load_problems
    from rollout.backends.hf import HFBackend
    from rollout.thinking import newline_token_ids, think_tag_ids, thinking_span
    from rollout.types import SamplingConfig

    be = HFBackend.from_pretrained(str(quick_model_dir))
    tok = be.tokenizer
    # unique golds: the fake verifier tells the problems apart by them
    problems = [
        Problem(p.id, p.problem, f"gold-{i}", p.meta)
        for i, p in enumerate(load_problems(DataConfig(split="test", limit=6)))
    ]
    chains = be.generate(encode_prompts(tok, problems, DataConfig()), SamplingConfig(max_tokens=80, temperature=0.0))
    open_id, close_id = think_tag_ids(tok)
    nl = newline_token_ids(tok)
    expect, needed = [], []
    for g in chains:
        s, e, _ = thinking_span(g.completion_ids, open_id, close_id)
        cuts = line_break_cuts(g.completion_ids, s, e, nl)
        expect.append(cuts[1] if len(cuts) >= 2 else e - s)
        needed.append(
            tok.decode(g.completion_ids[: s + cuts[1]], skip_special_tokens=False) if len(cuts) >= 2 else None
        )
    assert sum(x is not None for x in needed) >= 3  # the case under test happens

    def verify(texts, golds):
        return [
            needed[int(g.split("-")[1])] is not None and t.startswith(needed[int(g.split("-")[1])])
            for t, g in zip(texts, golds)
        ]

    rep = exit_oracle(be, problems, verify, max_tokens=80, chunk=4)
    assert [rep["items"][p.id]["oracle_think_tokens"] for p in problems] == expect
    assert rep["oracle_think_tokens"] == sum(expect) / len(expect)
    assert rep["n"] == 6 and set(rep["by_difficulty"]) <= {"2", "3", "4", "5", "6"}

    never = exit_oracle(be, problems, lambda t, g: [False] * len(t), max_tokens=80, chunk=4)
    assert never["oracle_think_tokens"] == never["think_tokens"] > rep["oracle_think_tokens"]
    assert never["exit_correct_share"] == 0.0
