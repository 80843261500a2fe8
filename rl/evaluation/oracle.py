"""The exit oracle: how short could the model's thinking be, along its own chains?

For each problem: the model's greedy chain; at every line break of its thinking, the thinking is cut
there, the exit prompt appended (``</think>`` and the answer cue, as S-GRPO's exits) and the answer
generated greedily; the verifier scores each forced answer. Over the cuts c_1 < ... < c_m:

    first_correct_i = min { c_j : the answer forced at c_j is correct }
    oracle_i        = min { c_j : the answers forced at c_j, c_(j+1), ..., c_m and the full chain's
                                  are all correct }                              (from there on, right)
    either one      = the full chain's thinking length when no such cut exists

``oracle_think_tokens`` (mean of ``oracle_i``) is the shortest thinking a policy could reach by
changing only where it stops on its own chains. ``first_correct_think_tokens`` is the literal earliest
correct exit; it counts lucky guesses (a forced answer on a half-written chain is often an
intermediate value, and on a modulo-10 task a guess is right about one time in ten, so with a dozen
cuts per chain nearly every problem has an early "correct" exit no policy could know to take).
A method that also compresses its lines can go below either.

The first line of the thinking (the first cut whose thinking has text) gets two more figures: the
accuracy of the answer forced right after it (``first_line_accuracy``: on the recheck task, the
first pass) and ``recheck_share``, the share of problems whose oracle exit lies after it (what
follows the first line, a re-check, is needed to be right from there on).
"""

from __future__ import annotations

from rl.data.problems import DataConfig, Problem, encode_prompts
from rollout.serial_group import SerialGroupConfig
from rollout.thinking import encode_in_context, newline_token_ids, scored_text, think_tag_ids, thinking_span
from rollout.types import BranchRequest, SamplingConfig


def line_break_cuts(completion_ids: list[int], start: int, end: int, newline_ids: frozenset[int]) -> list[int]:
    """Thinking lengths (tokens after ``start``) that end right after a line break of the thinking
    ``completion_ids[start:end]``, in order."""
    return [j + 1 - start for j in range(start, end) if completion_ids[j] in newline_ids]


def exit_oracle(
    backend,
    problems: list[Problem],
    verify_many,
    max_tokens: int = 400,
    answer_max_tokens: int = 16,
    exit_prompt: str | None = None,
    prompt: DataConfig | None = None,
    chunk: int = 64,
    progress: bool = True,
) -> dict:
    """The oracle's thinking per problem and its mean, overall and by difficulty (see the module
    docstring). ``verify_many(texts, golds) -> list[bool]`` scores the forced answers."""
    from tqdm import tqdm

    tok = backend.tokenizer
    open_id, close_id = think_tag_ids(tok)
    exit_ids = encode_in_context(tok, exit_prompt or SerialGroupConfig().exit_prompt)
    newline = newline_token_ids(tok)
    prompts = encode_prompts(tok, problems, prompt or DataConfig())
    items: dict[str, dict] = {}
    for c0 in tqdm(range(0, len(problems), chunk), desc="exit oracle", mininterval=5, disable=not progress):
        ps, ids = problems[c0 : c0 + chunk], prompts[c0 : c0 + chunk]
        chains = backend.generate(ids, SamplingConfig(max_tokens=max_tokens, temperature=0.0, n=1))
        spans = [thinking_span(g.completion_ids, open_id, close_id) for g in chains]
        cuts = [line_break_cuts(g.completion_ids, s, e, newline) for g, (s, e, _) in zip(chains, spans)]
        requests = [
            BranchRequest(list(p) + list(g.completion_ids), [len(p) + s + c for c in cs], exit_ids, route_len=len(p))
            for p, g, (s, _, _), cs in zip(ids, chains, spans, cuts)
        ]
        answers = backend.generate_branches(requests, SamplingConfig(max_tokens=answer_max_tokens, temperature=0.0))
        texts, golds, owner = [], [], []
        for i, (p, g, (s, _, _), cs, outs) in enumerate(zip(ids, chains, spans, cuts, answers)):
            texts.append(scored_text(tok, p, g.completion_ids))  # the full chain
            golds.append(ps[i].answer)
            owner.append((i, None))
            for c, a in zip(cs, outs):
                texts.append(scored_text(tok, p, list(g.completion_ids[: s + c]) + exit_ids + list(a.completion_ids)))
                golds.append(ps[i].answer)
                owner.append((i, c))
        verdicts = verify_many(texts, golds)
        for i, (p, g, (s, e, _)) in enumerate(zip(ps, chains, spans)):
            mine = [(c, bool(ok)) for (j, c), ok in zip(owner, verdicts) if j == i]
            full_ok, exits = mine[0][1], mine[1:]  # the full chain first, then the cuts in order
            oracle = stable_exit(exits, full_ok, e - s)
            first = next((c for c, _ in exits if tok.decode(g.completion_ids[s : s + c]).strip()), None)
            items[p.id] = {
                "think_tokens": e - s,
                "oracle_think_tokens": oracle,
                "first_line_tokens": first,
                "first_line_correct": dict(exits)[first] if first is not None else None,
                "recheck": first is not None and oracle > first,
                "first_correct_think_tokens": next((c for c, ok in exits if ok), e - s),
                "exits": len(exits),
                "exit_correct": any(ok for _, ok in exits),
                "full_correct": full_ok,
                "difficulty": p.meta.get("difficulty"),
            }
    return {**_summary(list(items.values())), "by_difficulty": _by_difficulty(items), "items": items}


def stable_exit(exits: list[tuple[int, bool]], full_ok: bool, full_len: int) -> int:
    """The earliest cut from which every later forced answer, and the full chain's, is correct
    (``exits``: (cut, correct) in order); ``full_len`` when there is none."""
    best = full_len
    if not full_ok:
        return best
    for c, ok in reversed(exits):
        if not ok:
            break
        best = c
    return best


def _summary(its: list[dict]) -> dict:
    n = max(1, len(its))
    firsts = [i["first_line_correct"] for i in its if i["first_line_correct"] is not None]
    return {
        "n": len(its),
        "oracle_think_tokens": sum(i["oracle_think_tokens"] for i in its) / n,
        "first_correct_think_tokens": sum(i["first_correct_think_tokens"] for i in its) / n,
        "think_tokens": sum(i["think_tokens"] for i in its) / n,  # the full greedy chains
        "exits_per_chain": sum(i["exits"] for i in its) / n,
        "exit_correct_share": sum(i["exit_correct"] for i in its) / n,  # some exit along the chain is right
        "full_correct_share": sum(i["full_correct"] for i in its) / n,
        "first_line_accuracy": sum(firsts) / len(firsts) if firsts else None,
        "recheck_share": sum(i["recheck"] for i in its) / n,
    }


def _by_difficulty(items: dict[str, dict]) -> dict:
    groups: dict[str, list[dict]] = {}
    for it in items.values():
        if it["difficulty"] is not None:
            groups.setdefault(str(it["difficulty"]), []).append(it)
    return {k: _summary(groups[k]) for k in sorted(groups, key=int)}
