"""``exitrl routers label`` and ``exitrl routers train``: the router recipe end to end.

Files under the output folder::

    search_labels.jsonl  one searched plan per searched problem, with every plan found correct (resumable)
    labels.jsonl         the label per problem: search labels consolidated onto robust plans
                         (``plan_vocabulary``); the search labels themselves when ``vocab_size`` is 0
    label_stats.json     class shares, per-layer skip / repeat rates, the vocabulary's pass rates,
                         teacher forcing vs generation
    routers/             routers.safetensors + routers.json + train_metrics.json
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rl.data.problems import DataConfig, Problem, encode_prompts
from rl.data.synthetic_task import router_label_problems
from rl.routing.label_search import (
    LabelSearchConfig,
    greedy_cases,
    label_problems,
    label_stats,
    read_labels,
    score_plans,
)
from rl.routing.plan_vocabulary import VocabularyConfig, plan_vocabulary, robust_labels
from rl.routing.router_training import RouterTrainConfig, train_routers
from rollout.routing.routed_generation import routed_generate
from rollout.routing.routed_model import RoutedModel
from rollout.routing.router_features import router_features


@dataclass
class RoutersRecipe:
    """Labels and training of layer routers for one model."""

    model: str = field(default="tiny-deep", metadata={"help": "model folder or hub id ('tiny-deep': built locally)"})
    problems: int = field(default=600, metadata={"help": "problems to label (the first N of data.source)"})
    data: DataConfig = field(
        default_factory=DataConfig,
        metadata={
            "help": "the problems, as the trainer's data.* keys (source, columns, chat template); 'synthetic': "
            "the embedded task's router problems"
        },
    )
    agreement_sample: int = field(
        default=40, metadata={"help": "problems whose teacher-forced verdicts are checked against greedy generation"}
    )
    max_tokens: int = field(
        default=400, metadata={"help": "generation budget of the greedy completions and of the agreement check"}
    )
    label: LabelSearchConfig = field(default_factory=LabelSearchConfig)
    vocabulary: VocabularyConfig = field(default_factory=VocabularyConfig)
    train: RouterTrainConfig = field(default_factory=RouterTrainConfig)


def load_model(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rl.models.tiny_reasoner import resolve_model_path

    resolved = resolve_model_path(path)
    return AutoModelForCausalLM.from_pretrained(resolved).eval(), AutoTokenizer.from_pretrained(resolved), resolved


@dataclass
class LabelProblems:
    """The problems a recipe labels: ``problems`` (ids, texts, golds: empty when the data has none)
    and their prompts."""

    problems: list[Problem]
    prompts: list[list[int]]


def label_problems_of(recipe: RoutersRecipe, tok) -> LabelProblems:
    """The first ``recipe.problems`` problems of ``recipe.data`` (the trainer's loader), or of the
    embedded task's router problems when ``data.source`` is 'synthetic'."""
    from rl.data.problems import load_problems

    if recipe.data.source == "synthetic":
        arith = router_label_problems(recipe.problems)
        problems = [Problem(p.id, p.problem, p.answer, {"difficulty": p.difficulty}) for p in arith]
        return LabelProblems(problems, encode_prompts(tok, problems, recipe.data))
    problems = load_problems(recipe.data)[: recipe.problems]
    if not problems:
        raise ValueError(f"data.source {recipe.data.source}: no problems to label")
    return LabelProblems(problems, encode_prompts(tok, problems, recipe.data))


def run_label(recipe: RoutersRecipe, out_dir: str | Path, progress: bool = True, model_tok=None) -> dict:
    """Search the first ``vocabulary.search_problems`` problems (resuming ``search_labels.jsonl``),
    consolidate onto robust plans over all ``recipe.problems`` (``labels.jsonl``); write and return
    the label statistics, with the teacher-forcing vs generation agreement."""
    out = Path(out_dir)
    model, tok, _ = model_tok or load_model(recipe.model)
    routed = RoutedModel(model, mode="grouped")
    lp = label_problems_of(recipe, tok)
    problems, prompts = lp.problems, lp.prompts
    meta = {p.id: {"difficulty": p.meta["difficulty"]} for p in problems if "difficulty" in p.meta}
    voc = recipe.vocabulary
    with torch.inference_mode():
        cases = greedy_cases(routed, tok, problems, prompts, recipe.max_tokens)
        n_search = len(cases) if voc.vocab_size == 0 else min(len(cases), voc.search_problems)
        searched = label_problems(routed, cases[:n_search], out / "search_labels.jsonl", recipe.label, meta, progress)
        if voc.vocab_size == 0:
            rows, vocab_stats = searched, None
        else:
            rows, vocab_stats = consolidate(routed, cases, searched, recipe, meta, progress)
    tmp = out / "labels.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(out / "labels.jsonl")
    stats = label_stats(rows, routed.num_layers)
    stats["search"] = label_stats(searched, routed.num_layers)
    stats["vocabulary"] = vocab_stats
    stats["agreement"] = agreement_with_generation(routed, tok, cases, [p.answer for p in problems], rows, recipe)
    stats["data"] = {
        "source": recipe.data.source,
        "labelled": len(problems),
        "with_gold": sum(bool(p.answer) for p in problems),
    }
    (out / "label_stats.json").write_text(json.dumps(stats, indent=2))
    return stats


def consolidate(routed: RoutedModel, cases, searched: list[dict], recipe: RoutersRecipe, meta: dict, progress: bool):
    """Every case scored under the vocabulary of the search's plans; label rows of the robust labels
    and the vocabulary's statistics (plans, pass rates, how often each is the label)."""
    from tqdm import tqdm

    voc = recipe.vocabulary
    vocab = plan_vocabulary(searched, routed.num_layers, voc.vocab_size)
    plans = torch.tensor(vocab)
    passes = torch.stack(
        [
            score_plans(routed, c, plans, recipe.label.min_prob)
            if c.correct
            else torch.zeros(len(vocab), dtype=torch.bool)
            for c in tqdm(cases, desc="plan vocabulary", mininterval=5, disable=not progress)
        ]
    )  # [N, V]
    labels, rates = robust_labels(vocab, passes, voc.min_pass_rate)
    rows = [
        {
            "id": c.id,
            "plan": list(vocab[k]),
            "executed": sum(vocab[k]),
            "full_correct": bool(passes[i, -1]),
            **meta.get(c.id, {}),
        }
        for i, (c, k) in enumerate(zip(cases, labels))
    ]
    used = torch.bincount(torch.tensor(labels), minlength=len(vocab)).tolist()
    table = [
        {"plan": list(p), "executed": sum(p), "pass_rate": round(r, 4), "labels": u}
        for p, r, u in zip(vocab, rates, used)
    ]
    return rows, {"searched": len(searched), "min_pass_rate": voc.min_pass_rate, "plans": table}


@torch.no_grad()
def agreement_with_generation(routed: RoutedModel, tok, cases, golds: list[str], rows, recipe: RoutersRecipe) -> dict:
    """How often the teacher-forced verdict on a plan matches greedy generation under it: for a
    sample of searched problems, the label plan and one plan skipping a random pair of layers.
    Generation under a plan is right when its answer verifies against the gold (training's verifier),
    or, for a problem without one, when it is the full model's own greedy completion."""
    from rewards.verify import verify_answer

    by_id = {r["id"]: r for r in rows}
    rng = random.Random(recipe.label.seed)
    sample = [i for i, c in enumerate(cases) if by_id.get(c.id, {}).get("full_correct")]
    sample = rng.sample(sample, min(recipe.agreement_sample, len(sample)))
    if not sample:
        return {"pairs": 0}
    L = routed.num_layers
    pairs = []
    tf = []
    for i in sample:
        other = [1] * L
        a = rng.randrange(L - 1)
        other[a] = other[a + 1] = 0
        both = [by_id[cases[i].id]["plan"], other]
        pairs += [(i, plan) for plan in both]
        tf += score_plans(routed, cases[i], torch.tensor(both), recipe.label.min_prob).tolist()
    plans = torch.tensor([p for _, p in pairs])
    eos = {tok.eos_token_id}
    gen_ok = []
    for s in range(0, len(pairs), 32):
        chunk = pairs[s : s + 32]
        prompts = [cases[i].ids[: cases[i].prompt_len] for i, _ in chunk]
        res = routed_generate(
            routed, prompts, max_tokens=recipe.max_tokens, eos_ids=eos, pad_id=tok.pad_token_id, plans=plans[s : s + 32]
        )
        for (i, _), r in zip(chunk, res):
            text = tok.decode(r.tokens)
            if golds[i]:
                gen_ok.append(verify_answer(text, golds[i]))
            else:  # no gold: the plan must generate the full model's own completion
                gen_ok.append(list(r.tokens) == cases[i].ids[cases[i].prompt_len :])
    agree = [a == b for a, b in zip(tf, gen_ok)]
    good = [g for t, g in zip(tf, gen_ok) if t]
    return {
        "pairs": len(pairs),
        "agreement": sum(agree) / len(agree),
        "generation_correct_when_tf_correct": sum(good) / len(good) if good else None,
        "tf_correct_share": sum(tf) / len(tf),
        "generation_correct_share": sum(gen_ok) / len(gen_ok),
    }


def run_train(recipe: RoutersRecipe, out_dir: str | Path, log=print, model_tok=None) -> dict:
    """Train routers on ``labels.jsonl``; saves ``routers/`` and returns the metrics."""
    out = Path(out_dir)
    labels_path = out / "labels.jsonl"
    if not labels_path.exists():
        raise FileNotFoundError(f"{labels_path}: no labels (run `exitrl routers label` first)")
    rows = read_labels(labels_path)
    model, tok, resolved = model_tok or load_model(recipe.model)
    routed = RoutedModel(model, mode="grouped")
    lp = label_problems_of(recipe, tok)
    prompt_of = dict(zip((p.id for p in lp.problems), lp.prompts))
    missing = [r["id"] for r in rows if r["id"] not in prompt_of]
    if missing:
        raise ValueError(
            f"{labels_path}: {len(missing)} label ids are not in this recipe's problems, e.g. {missing[0]}"
        )
    bad = [r["id"] for r in rows if len(r["plan"]) != routed.num_layers]
    if bad:
        raise ValueError(f"{labels_path}: plan of {bad[0]} has the wrong length (model has {routed.num_layers} layers)")
    plans = torch.tensor([r["plan"] for r in rows], dtype=torch.long)
    means, valid = router_features(routed, [prompt_of[r["id"]] for r in rows], plans, recipe.train.num_windows)
    routers, metrics = train_routers(means, valid, plans, recipe.train, log=log)
    dest = routers.save(out / "routers")
    metrics.update(model=resolved, labels=str(labels_path), recipe=asdict(recipe))
    (dest / "train_metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
