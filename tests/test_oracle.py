"""The exit oracle: cuts at every line break of the greedy chain, the earliest correct one kept."""

from rl.evaluation.oracle import exit_oracle, line_break_cuts, stable_exit


def test_line_break_cuts_are_thinking_lengths_after_each_newline():
    nl = frozenset({9})
    #      0  1  2  3  4  5  6  7  8     thinking = [1:7]
    ids = [5, 9, 3, 4, 9, 6, 9, 9, 2]
    assert line_break_cuts(ids, 1, 7, nl) == [1, 4, 6]  # the 9 at index 7 is past the thinking


def test_stable_exit_is_the_start_of_the_last_run_of_correct_exits():
    exits = [(3, True), (7, False), (12, True), (20, True)]
    assert stable_exit(exits, True, 25) == 12  # 3 was a lucky guess: 7 is wrong again
    assert stable_exit(exits, False, 25) == 25  # the full chain is wrong: no stable exit
    assert stable_exit([(3, True), (7, False)], True, 25) == 25
    assert stable_exit([], True, 25) == 25


def test_oracle_on_real_chains_keeps_the_earliest_stable_exit(quick_model_dir):
    """A verifier that calls a forced answer right at cut 0 and from cut 2 on (and the full chain):
    the oracle is each chain's third cut, the first-correct figure its first (both computed here from
    the chain itself); chains with fewer than three cuts are never right and count their full length."""
    from rl.data.problems import DataConfig, Problem, encode_prompts, load_problems
    from rollout.backends.hf import HFBackend
    from rollout.serial_group import SerialGroupConfig
    from rollout.thinking import encode_in_context, newline_token_ids, think_tag_ids, thinking_span
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
    exit_ids = encode_in_context(tok, SerialGroupConfig().exit_prompt)
    stable, first, prefixes, first_line = [], [], [], []
    for g in chains:
        s, e, _ = thinking_span(g.completion_ids, open_id, close_id)
        cuts = line_break_cuts(g.completion_ids, s, e, nl)
        ok = len(cuts) >= 3
        # the first line: the first cut with text before it; its forced answer right iff it is cut 0 or >= 2
        j = next((k for k, c in enumerate(cuts) if tok.decode(g.completion_ids[s : s + c]).strip()), None)
        first_line.append(None if j is None else (cuts[j], ok and (j == 0 or j >= 2)))
        stable.append(cuts[2] if ok else e - s)
        first.append(cuts[0] if ok else e - s)
        prefixes.append(
            [tok.decode(list(g.completion_ids[: s + c]) + exit_ids, skip_special_tokens=False) for c in cuts]
            if ok
            else []
        )
    assert sum(bool(p) for p in prefixes) >= 3  # the case under test happens

    def verify(texts, golds):
        out = []
        for t, g in zip(texts, golds):
            pre = prefixes[int(g.split("-")[1])]
            cut = next((j for j in range(len(pre) - 1, -1, -1) if t.startswith(pre[j])), None)
            out.append(bool(pre) and (cut is None or cut == 0 or cut >= 2))  # None: the full chain
        return out

    rep = exit_oracle(be, problems, verify, max_tokens=80, chunk=4)
    assert [rep["items"][p.id]["oracle_think_tokens"] for p in problems] == stable
    assert [rep["items"][p.id]["first_correct_think_tokens"] for p in problems] == first
    assert rep["oracle_think_tokens"] == sum(stable) / len(stable) > rep["first_correct_think_tokens"]
    assert rep["n"] == 6 and set(rep["by_difficulty"]) <= {"2", "3", "4", "5", "6"}
    got = [rep["items"][p.id] for p in problems]
    assert [(i["first_line_tokens"], i["first_line_correct"]) if i["first_line_tokens"] else None for i in got] == [
        fl if fl else None for fl in first_line
    ]
    assert any(fl and not fl[1] for fl in first_line)  # a first line whose forced answer is wrong happens
    recheck = [bool(fl) and st > fl[0] for fl, st in zip(first_line, stable)]
    assert [i["recheck"] for i in got] == recheck and rep["recheck_share"] == sum(recheck) / 6

    never = exit_oracle(be, problems, lambda t, g: [False] * len(t), max_tokens=80, chunk=4)
    assert never["oracle_think_tokens"] == never["think_tokens"] > rep["oracle_think_tokens"]
    assert never["exit_correct_share"] == 0.0
