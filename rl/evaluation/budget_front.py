"""The accuracy-thinking front a model gives with no training (``exitrl eval --think-budgets``).

For each budget B: a problem's thinking is cut after B tokens and closed with the exit prompt the
serial groups use (``DEFAULT_EXIT_PROMPT``, encoded in context), and the model answers greedily; a
thought that closed by itself within B tokens keeps its own answer. Greedy decoding writes the same
first B thinking tokens whatever the budget, so each problem's chain is generated once and every
budget branches from it (``BranchRequest``, as the serial groups and the exit oracle do): the front
costs one chain plus one short answer per budget and problem.

Per budget: ``accuracy`` (with its bootstrap CI), ``think_tokens`` (mean kept thinking: min(B, the
chain's own); the exit prompt's tokens are not thinking) and ``forced_share`` (problems whose
thinking was cut). The point without a budget (the chains themselves) comes last, as ``budget``
None.
"""

from __future__ import annotations

from rl.data.problems import DataConfig, Problem, encode_prompts
from rl.evaluation.scoring import EvalError, bootstrap_ci
from rollout.thinking import DEFAULT_EXIT_PROMPT, encode_in_context, scored_text, think_tag_ids, thinking_span
from rollout.types import BranchRequest, SamplingConfig


def parse_budgets(text: str) -> list[int]:
    """``--think-budgets 0,16,32``: distinct integers >= 0, ascending."""
    try:
        budgets = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise EvalError(f"--think-budgets must be a comma list of integers >= 0, got {text!r}") from None
    if not budgets or budgets[0] < 0:
        raise EvalError(f"--think-budgets must be a comma list of integers >= 0, got {text!r}")
    return budgets


def budget_front(
    backend,
    problems: list[Problem],
    budgets: list[int],
    verify_many,
    max_tokens: int = 1024,
    answer_max_tokens: int = 32,
    exit_prompt: str = DEFAULT_EXIT_PROMPT,
    prompt: DataConfig | None = None,
    chunk: int = 64,
    progress: bool = True,
) -> list[dict]:
    """One point per budget, then the unbudgeted chains' (see the module docstring).
    ``verify_many(texts, golds) -> list[bool]``."""
    from tqdm import tqdm

    tok = backend.tokenizer
    open_id, close_id = think_tag_ids(tok)
    exit_ids = encode_in_context(tok, exit_prompt)
    if close_id not in exit_ids:
        raise EvalError(f"the exit prompt {exit_prompt!r} does not close the thinking with '</think>'")
    prompts = encode_prompts(tok, problems, prompt or DataConfig())
    texts: dict[int | None, list[str]] = {b: [] for b in [*budgets, None]}
    think: dict[int | None, list[int]] = {b: [] for b in texts}
    forced_n = dict.fromkeys(texts, 0)
    for c0 in tqdm(range(0, len(problems), chunk), desc="think budgets", mininterval=5, disable=not progress):
        ids = prompts[c0 : c0 + chunk]
        chains = backend.generate(ids, SamplingConfig(max_tokens=max_tokens, temperature=0.0))
        spans = [thinking_span(g.completion_ids, open_id, close_id) for g in chains]
        cut = [[b for b in budgets if b < e - s] for s, e, _ in spans]  # thinking longer than b: forced
        requests = [
            BranchRequest(list(p) + list(g.completion_ids), [len(p) + s + b for b in bs], exit_ids, route_len=len(p))
            for p, g, (s, _, _), bs in zip(ids, chains, spans, cut)
        ]
        answers = (
            backend.generate_branches(requests, SamplingConfig(max_tokens=answer_max_tokens, temperature=0.0))
            if any(cut)
            else [[] for _ in requests]
        )
        for p, g, (s, e, _), bs, outs in zip(ids, chains, spans, cut, answers):
            forced = dict(zip(bs, outs))
            own = scored_text(tok, p, g.completion_ids)
            for b in texts:
                if b in forced:
                    comp = list(g.completion_ids[: s + b]) + exit_ids + list(forced[b].completion_ids)
                    texts[b].append(scored_text(tok, p, comp))
                    think[b].append(b)
                    forced_n[b] += 1
                else:
                    texts[b].append(own)
                    think[b].append(e - s)
    golds = [p.answer for p in problems]
    front = []
    for b in texts:
        ok = [float(v) for v in verify_many(texts[b], golds)]
        n = max(1, len(ok))
        front.append(
            {
                "budget": b,
                "accuracy": sum(ok) / n,
                "accuracy_ci95": list(bootstrap_ci(ok)),
                "think_tokens": sum(think[b]) / n,
                "forced_share": forced_n[b] / n,
                "n": len(ok),
            }
        )
    return front


def plot_budget_front(fronts: dict[str, list[dict]], path) -> None:
    """Accuracy against mean thinking tokens, one line per benchmark, budgets annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, front in fronts.items():
        pts = sorted(front, key=lambda p: p["think_tokens"])
        ax.plot([p["think_tokens"] for p in pts], [p["accuracy"] for p in pts], marker="o", label=name)
        for p in pts:
            tag = "no budget" if p["budget"] is None else str(p["budget"])
            ax.annotate(tag, (p["think_tokens"], p["accuracy"]), fontsize=6)
    ax.set(xlabel="mean thinking tokens", ylabel="accuracy", title="accuracy against a forced thinking budget")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
