"""Router labels by search over layer configurations (Dr.LLM), scored by teacher forcing.

For one problem, a configuration is a plan ``[L]`` (0 skip, 1 execute, 2 repeat). The search starts
at the all-execute plan; a node's children skip one layer, skip two consecutive layers, or repeat
one. Each expansion scores all children of the selected node in one batched, teacher-forced
forward; selection walks down by UCB over the correct configurations::

    ucb(child) = Q / v + c * sqrt(ln N_parent / v) - length_penalty * executed(child) / L

with a random correct child 10% of the time. The label is the shortest correct configuration found
(fewest executed passes; ties: the first found).

"Correct" is decided by teacher forcing, not generation: one sequence runs once under the plan,
and every *checked* token must be the plan's argmax. The sequence:
prompt + the full model's own greedy completion (thinking, re-checks,
  answer, EOS), every completion token checked. A plan that passes reproduces that completion token
  for token, so greedy generation under it *is* the full model's generation: the teacher-forced
  verdict and generation agree by construction. Problems the full model answers wrong keep the
  all-execute label.

(Checking only the reference computation's step lines or result digits was cheaper and blind to the
re-checks; that option is gone: docs/results/ablations.md.)

``agreement_with_generation`` measures how often the verdict and generation agree.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rollout.routing.routed_generation import left_pad
from rollout.routing.routed_model import RoutedModel


@dataclass
class LabelSearchConfig:
    """How configurations are searched for one problem."""

    budget: int = field(default=8, metadata={"help": "node expansions per problem (each scores all its children)"})
    ucb_c: float = field(default=1.8, metadata={"help": "UCB exploration constant"})
    length_penalty: float = field(default=3.0, metadata={"help": "UCB penalty per executed pass / L"})
    random_child: float = field(default=0.1, metadata={"help": "probability of descending to a random correct child"})
    allow_repeat: bool = field(default=True, metadata={"help": "children may repeat a layer"})
    seed: int = field(default=0, metadata={"help": "seed of the search's random choices"})
    min_prob: float = field(
        default=0.0,
        metadata={
            "help": "a checked token must also have probability >= this under the plan (0: argmax is enough); "
            "plans that only just keep the argmax fail in generation"
        },
    )


@dataclass
class TeacherForcedCase:
    """One sequence to teacher-force: ``ids`` (prompt first), and the positions whose token the
    plan's argmax (at the position before) must reproduce."""

    id: str
    ids: list[int]
    prompt_len: int
    checks: list[int]
    correct: bool = True  # the sequence answers right (False: nothing to preserve, the label is all-execute)


def greedy_case(case_id: str, prompt_ids: list[int], completion: list[int], correct: bool) -> TeacherForcedCase:
    """prompt + the full model's greedy ``completion``; every completion token is checked."""
    n = len(prompt_ids)
    checks = list(range(n, n + len(completion)))
    return TeacherForcedCase(case_id, list(prompt_ids) + list(completion), n, checks, correct)


@torch.no_grad()
def greedy_cases(
    routed: RoutedModel,
    tokenizer,
    problems: list,
    prompts: list[list[int]],
    max_tokens: int,
    batch_size: int = 64,
) -> list[TeacherForcedCase]:
    """The ``greedy`` cases of ``problems`` (anything with ``id`` and ``answer``: ``Problem``,
    ``ArithmeticProblem``): each prompt completed greedily by the full model (batched). Where the
    problem has a gold answer, a completion is correct when it ends with EOS and verifies against it
    (``rewards.verify.verify_answer``, training's verifier); without a gold, the full model's own
    completion is the reference a plan must reproduce, token for token."""
    from rewards.verify import verify_answer
    from rollout.routing.routed_generation import routed_generate

    cases = []
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s : s + batch_size]
        rows = routed_generate(
            routed, chunk, max_tokens=max_tokens, eos_ids={tokenizer.eos_token_id}, pad_id=tokenizer.pad_token_id,
            plans=routed.full_plan(len(chunk)),
        )  # fmt: skip
        for p, p_ids, row in zip(problems[s : s + batch_size], chunk, rows):
            ok = not p.answer or (row.finish == "stop" and verify_answer(tokenizer.decode(row.tokens), p.answer))
            cases.append(greedy_case(p.id, p_ids, row.tokens, ok))
    return cases


@torch.no_grad()
def score_plans(
    routed: RoutedModel, case: TeacherForcedCase, plans: torch.Tensor, min_prob: float = 0.0
) -> torch.Tensor:
    """good [K]: under plan k, every checked token of ``case`` is the argmax, with probability at
    least ``min_prob`` (one batched forward; the K plans' hidden states at the checked positions go
    through the exit head together, never as [K, T, V] logits)."""
    K = plans.shape[0]
    ids, attn = left_pad([case.ids] * K, 0, routed.device)
    hidden = routed(ids, attn, plan=plans.to(routed.device), lm_head=False).hidden  # [K, T, d]
    at = torch.tensor(case.checks, device=ids.device)
    read = routed.readout(hidden[:, at - 1], ids[:, at])  # S = K plans, N = C checked positions
    good = read.argmax == ids[:, at]
    if min_prob > 0:
        good &= read.target_logp >= math.log(min_prob)
    return good.all(-1).cpu()


@dataclass
class _Node:
    plan: tuple[int, ...]
    good: bool
    visits: int = 1
    value: float = 0.0
    expanded: bool = False
    children: list[_Node] = field(default_factory=list)


def neighbours(plan: tuple[int, ...], allow_repeat: bool = True) -> list[tuple[int, ...]]:
    """Skip one executed layer, skip two consecutive ones, or repeat one."""
    out = []
    for layer, a in enumerate(plan):
        if a != 1:
            continue
        out.append(plan[:layer] + (0,) + plan[layer + 1 :])
        if layer + 1 < len(plan) and plan[layer + 1] == 1:
            out.append(plan[:layer] + (0, 0) + plan[layer + 2 :])
        if allow_repeat:
            out.append(plan[:layer] + (2,) + plan[layer + 1 :])
    return out


@dataclass
class SearchResult:
    plan: list[int]
    full_correct: bool  # the all-execute plan passes the check (else the label is all-execute)
    scored: int  # configurations scored
    passing: list[list[int]] = field(default_factory=list)  # every configuration found correct


def search_plan(routed: RoutedModel, case: TeacherForcedCase, cfg: LabelSearchConfig) -> SearchResult:
    """The shortest correct configuration the UCB search finds for ``case``."""
    if not case.correct:
        return SearchResult([1] * routed.num_layers, False, 0)
    return search(lambda plans: score_plans(routed, case, plans, cfg.min_prob), routed.num_layers, cfg, key=case.id)


def search(score, num_layers: int, cfg: LabelSearchConfig, key: str = "") -> SearchResult:
    """The UCB search over plans of ``num_layers`` layers; ``score(plans [K, L]) -> good [K]``."""
    L = num_layers
    rng = random.Random(f"{cfg.seed}:{key}")
    full = (1,) * L
    root = _Node(full, bool(score(torch.tensor([full]))[0]))
    if not root.good:
        return SearchResult(list(full), False, 1)
    root.value = 1.0
    nodes = {full: root}
    best = root

    def ucb(parent: _Node, child: _Node) -> float:
        explore = cfg.ucb_c * math.sqrt(math.log(max(parent.visits, 1)) / child.visits)
        return child.value / child.visits + explore - cfg.length_penalty * sum(child.plan) / L

    for _ in range(cfg.budget):
        node, path = root, [root]
        while node.expanded:
            good = [c for c in node.children if c.good]
            if not good:
                break
            node = rng.choice(good) if rng.random() < cfg.random_child else max(good, key=lambda c: ucb(path[-1], c))
            path.append(node)
        if node.expanded:  # a correct configuration with no correct child: the search is done
            break
        kids = neighbours(node.plan, cfg.allow_repeat)
        new = [k for k in kids if k not in nodes]
        if new:
            verdict = score(torch.tensor(new)).tolist()
            for k, ok in zip(new, verdict):
                nodes[k] = _Node(k, bool(ok), value=float(ok))
        node.children = [nodes[k] for k in kids]
        node.expanded = True
        reward = sum(nodes[k].good for k in new)
        for n in path:
            n.visits += len(new)
            n.value += reward
        for k in new:
            c = nodes[k]
            if c.good and sum(c.plan) < sum(best.plan):
                best = c
    passing = [list(p) for p, n in nodes.items() if n.good]
    return SearchResult(list(best.plan), True, len(nodes), passing)


def label_problems(
    routed: RoutedModel,
    cases: list[TeacherForcedCase],
    out: Path,
    cfg: LabelSearchConfig,
    meta: dict[str, dict] | None = None,
    progress: bool = True,
) -> list[dict]:
    """Search every case, appending one JSON line per problem to ``out``; cases already in ``out``
    are skipped (resumable: a killed run loses at most the line being written)."""
    from tqdm import tqdm

    out.parent.mkdir(parents=True, exist_ok=True)
    rows = read_labels(out) if out.exists() else []
    done = {r["id"] for r in rows}
    todo = [c for c in cases if c.id not in done]
    with out.open("a") as fh:
        for case in tqdm(todo, desc="router labels", mininterval=5, disable=not progress):
            res = search_plan(routed, case, cfg)
            row = {
                "id": case.id,
                "plan": res.plan,
                "executed": sum(res.plan),
                "full_correct": res.full_correct,
                "scored": res.scored,
                "passing": res.passing,
                **(meta or {}).get(case.id, {}),
            }
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            rows.append(row)
    return rows


def read_labels(path: Path) -> list[dict]:
    """Label rows of a JSONL file; a torn last line (a kill mid-write) is dropped, any other bad
    line is an error naming the file and line."""
    rows = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON line") from None
        for key in ("id", "plan"):
            if key not in row:
                raise ValueError(f"{path}:{i + 1}: label row lacks {key!r}")
        rows.append(row)
    return rows


def label_stats(rows: list[dict], num_layers: int) -> dict:
    """Class shares, per-layer skip / repeat rates, executed passes, by difficulty where known."""
    plans = torch.tensor([r["plan"] for r in rows], dtype=torch.long)  # [N, L]
    if plans.numel() == 0:
        return {"problems": 0}
    counts = torch.bincount(plans.flatten(), minlength=3).tolist()
    total = sum(counts)
    stats = {
        "problems": len(rows),
        "full_correct": sum(bool(r.get("full_correct")) for r in rows) / len(rows),
        "class_counts": {"skip": counts[0], "execute": counts[1], "repeat": counts[2]},
        "class_shares": {k: round(c / total, 4) for k, c in zip(("skip", "execute", "repeat"), counts)},
        "executed_mean": float(plans.sum(1).float().mean()),
        "layer_fraction": float(plans.sum(1).float().mean()) / num_layers,
        "skip_rate_per_layer": [round(float(x), 3) for x in (plans == 0).float().mean(0)],
        "repeat_rate_per_layer": [round(float(x), 3) for x in (plans == 2).float().mean(0)],
        "shorter_share": float((plans.sum(1) < num_layers).float().mean()),
    }
    if all("scored" in r for r in rows):  # search rows (consolidated labels are not searched)
        stats["scored_mean"] = sum(r["scored"] for r in rows) / len(rows)
    by: dict[int, list[int]] = {}
    for r in rows:
        if "difficulty" in r:
            by.setdefault(int(r["difficulty"]), []).append(sum(r["plan"]))
    if by:
        stats["executed_by_difficulty"] = {str(k): round(sum(v) / len(v), 3) for k, v in sorted(by.items())}
    return stats
