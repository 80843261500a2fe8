"""``exitrl eval``: accuracy and efficiency on math benchmarks, from a model or saved generations.

    exitrl eval --model PATH --benchmarks gsm8k,math500 --data-dir ../shared/benchmarks \\
        --strategy greedy|sample|majority|ffs --n K --backend vllm|hf --save-responses out.jsonl
    exitrl eval --responses out.jsonl --benchmarks gsm8k --data-dir DIR --json     # re-score only
    exitrl eval compare RUN_A.json RUN_B.json                                        # side by side

Saved responses are JSONL records ``{"benchmark", "id", "sample", "response", "completion_tokens",
"think_tokens", "closed", "total_tokens", "sequential_tokens"}``; an interrupted evaluation resumes
from them (records already there are never regenerated).
"""

from __future__ import annotations

import json
import random
import statistics
from dataclasses import dataclass
from pathlib import Path

from rl.problems import DataConfig, Problem, load_problems

# name -> (hub id, config, split, problem key, answer key, answer after ####)
HUB_BENCHMARKS = {
    "gsm8k": ("openai/gsm8k", "main", "test", "question", "answer", True),
    "math500": ("HuggingFaceH4/MATH-500", None, "test", "problem", "answer", False),
    "aime24": ("HuggingFaceH4/aime_2024", None, "train", "problem", "answer", False),
    "aime25": ("yentinglin/aime_2025", None, "train", "problem", "answer", False),
    "amc23": ("math-ai/amc23", None, "test", "question", "answer", False),
    "gpqa_diamond": ("Idavidrein/gpqa", "gpqa_diamond", "train", "Question", "Correct Answer", False),
}
SYNTHETIC = "synthetic"


class EvalError(ValueError):
    pass


def load_benchmark(name: str, data_dir: str | None = None, limit: int | None = None) -> list[Problem]:
    """Local ``<data_dir>/<name>.jsonl`` (id, problem, answer) when given, else the hub dataset;
    ``synthetic`` is the demo task's held-out set."""
    if name == SYNTHETIC:
        return load_problems(DataConfig(source="synthetic", split="test", limit=limit or 200))
    if data_dir:
        path = Path(data_dir) / f"{name}.jsonl"
        if not path.exists():
            raise EvalError(f"benchmark {name!r}: {path} not found (expected <data-dir>/<name>.jsonl with id, problem, answer)")
        return load_problems(DataConfig(source=str(path), limit=limit))
    if name not in HUB_BENCHMARKS:
        raise EvalError(f"unknown benchmark {name!r}; known: {sorted(HUB_BENCHMARKS) + [SYNTHETIC]} (or pass --data-dir)")
    hub, subset, split, pk, ak, hashes = HUB_BENCHMARKS[name]
    return load_problems(DataConfig(source=hub, subset=subset, split=split, problem_key=pk, answer_key=ak, id_key=None,
                                    answer_after_hashes=hashes, limit=limit))


# ---------------------------------------------------------------------------------- scoring


def bootstrap_ci(values: list[float], n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over items."""
    if not values:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    k = len(values)
    means = sorted(sum(values[rng.randrange(k)] for _ in range(k)) / k for _ in range(n_boot))
    return means[int(alpha / 2 * n_boot)], means[min(n_boot - 1, int((1 - alpha / 2) * n_boot))]


def accuracy_efficiency_score(acc: float, tokens: float, base_acc: float, base_tokens: float,
                              alpha: float = 1.0, beta: float = 3.0, gamma: float = 5.0) -> float:
    """AES (Luo et al., O1-Pruner): rewards length saved, penalises accuracy lost more than it
    rewards accuracy gained.

        dL = (L_base - L) / L_base,  dA = (A - A_base) / A_base
        AES = alpha dL + beta |dA|   if dA >= 0,   alpha dL - gamma |dA|   otherwise
    """
    dl = (base_tokens - tokens) / base_tokens if base_tokens else 0.0
    da = (acc - base_acc) / base_acc if base_acc else 0.0
    return alpha * dl + (beta * abs(da) if da >= 0 else -gamma * abs(da))


def score_records(records: list[dict], problems: list[Problem], strategy: str, n: int, verify_many) -> dict:
    """Metrics of one benchmark from its saved records
    (``verify_many(responses, golds) -> list[bool]``, e.g. the isolated batch verifier)."""
    from rewards.verify import extract_answer
    from rollout.ffs import majority_vote

    gold = {p.id: p.answer for p in problems}
    by_item: dict[str, list[dict]] = {}
    for r in records:
        if r["id"] not in gold:
            raise EvalError(f"saved response for id {r['id']!r} is not in the benchmark ({len(gold)} items)")
        by_item.setdefault(r["id"], []).append(r)
    missing = [pid for pid in gold if pid not in by_item]
    if missing:
        raise EvalError(f"{len(missing)} benchmark items have no saved response (first: {missing[0]!r}); rerun to resume generation")
    verdict = dict(zip((id(r) for r in records), verify_many([r["response"] for r in records], [gold[r["id"]] for r in records])))
    item_acc, think, comp, total, seq, closed = [], [], [], [], [], []
    for pid, recs in by_item.items():
        recs = sorted(recs, key=lambda r: r["sample"])
        ok = [verdict[id(r)] for r in recs]
        if strategy == "majority":
            answers = [extract_answer(r["response"]) for r in recs]
            winner = majority_vote(answers)
            pick = next((o for a, o in zip(answers, ok) if a == winner), False) if winner is not None else False
            item_acc.append(float(pick))
        else:
            item_acc.append(sum(ok) / len(ok))  # pass@1 averaged over samples (ffs: the winner)
        for r in recs:
            if r.get("think_tokens") is not None:
                think.append(r["think_tokens"])
            if r.get("completion_tokens") is not None:
                comp.append(r["completion_tokens"])
            closed.append(bool(r.get("closed", "</think>" in r["response"] or "<think>" not in r["response"])))
        total.append(recs[0].get("total_tokens") or sum(r.get("completion_tokens") or 0 for r in recs))
        seq.append(recs[0].get("sequential_tokens") or max((r.get("completion_tokens") or 0) for r in recs))
    lo, hi = bootstrap_ci(item_acc)
    key = {"majority": f"maj@{n}", "ffs": f"ffs@{n}"}.get(strategy, "pass@1")
    return {
        "n_items": len(item_acc),
        "samples_per_item": n,
        "metric": key,
        "accuracy": sum(item_acc) / len(item_acc),
        "accuracy_ci95": [lo, hi],
        "think_tokens_mean": statistics.mean(think) if think else None,
        "think_tokens_median": statistics.median(think) if think else None,
        "completion_tokens_mean": statistics.mean(comp) if comp else None,
        "total_tokens_mean": statistics.mean(total) if total else None,
        "sequential_tokens_mean": statistics.mean(seq) if seq else None,
        "unclosed_thinking_share": 1 - sum(closed) / len(closed) if closed else None,
        "layers_executed_mean": None,  # filled when the model routes layers
    }


# ---------------------------------------------------------------------------------- generation


@dataclass
class EvalSettings:
    strategy: str = "greedy"
    n: int = 1
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 1024
    seed: int = 0


def _token_record(tok, gen, close_id) -> dict:
    from rl.demo import thinking_tokens

    ids = gen.completion_ids
    return {"response": tok.decode(ids, skip_special_tokens=False), "completion_tokens": len(ids),
            "think_tokens": thinking_tokens(ids, close_id), "closed": close_id in ids, "finish_reason": gen.finish_reason}


def generate_records(backend, bench: str, problems: list[Problem], s: EvalSettings, done: set[tuple[str, int]], sink) -> int:
    """Generate what ``done`` lacks and append records through ``sink``; returns how many."""
    from rl.problems import build_prompt
    from rollout.ffs import first_finish_search
    from rollout.types import SamplingConfig

    tok = backend.tokenizer
    close_id = tok.convert_tokens_to_ids("</think>")
    samples = 1 if s.strategy == "greedy" else s.n
    todo = [p for p in problems if any((p.id, k) not in done for k in range(1 if s.strategy == "ffs" else samples))]
    if not todo:
        return 0
    prompts = [tok(build_prompt(tok, p.problem), add_special_tokens=False)["input_ids"] for p in todo]
    temp = 0.0 if s.strategy == "greedy" else s.temperature
    written = 0
    chunk = 64
    from tqdm import tqdm

    for c0 in tqdm(range(0, len(todo), chunk), desc=f"eval {bench}", mininterval=5):
        ps, ids = todo[c0 : c0 + chunk], prompts[c0 : c0 + chunk]
        sampling = SamplingConfig(max_tokens=s.max_tokens, temperature=temp, top_p=s.top_p, n=samples, seed=s.seed + c0)
        if s.strategy == "ffs":
            for p, r in zip(ps, first_finish_search(backend, ids, sampling)):
                sink({"benchmark": bench, "id": p.id, "sample": 0, **_token_record(tok, r.winner, close_id),
                      "total_tokens": r.total_tokens, "sequential_tokens": r.sequential_tokens})
                written += 1
            continue
        gens = backend.generate(ids, sampling)
        seen = [0] * len(ps)  # sample index per prompt, in the backend's prompt-major order
        for g in gens:
            p = ps[g.prompt_index]
            k = seen[g.prompt_index]
            seen[g.prompt_index] += 1
            if (p.id, k) in done:
                continue
            sink({"benchmark": bench, "id": p.id, "sample": k, **_token_record(tok, g, close_id)})
            written += 1
    return written


def drop_partial_tail(path: Path) -> None:
    """Cut a last line left unfinished by a kill mid-write, so appends start on a fresh line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def read_records(path: Path) -> list[dict]:
    out = []
    if not path.exists():
        return out
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            # a line cut by a kill mid-write is dropped (it is regenerated); anything else is an error
            if n == len(lines):
                continue
            raise EvalError(f"{path}: line {n} is not valid JSON")
        for key in ("id", "sample", "response"):
            if key not in r:
                raise EvalError(f"{path}: line {n}: missing field '{key}'")
        out.append(r)
    return out


# ---------------------------------------------------------------------------------- driver


def make_backend(model: str, backend: str):
    from rl.train import resolve_model_path

    path = resolve_model_path(model)
    if backend == "vllm":
        from rollout.vllm_backend import VLLMBackend

        return VLLMBackend.from_pretrained(path)
    from rollout.hf_backend import HFBackend

    return HFBackend.from_pretrained(path)


def run_eval(benchmarks: list[str], data_dir: str | None, settings: EvalSettings, model: str | None = None,
             backend: str = "vllm", responses: str | None = None, save_responses: str | None = None,
             limit: int | None = None, baseline: str | None = None, verifier_workers: int = 2) -> dict:
    """Generate (or load) responses for each benchmark and score them; returns the report."""
    from rewards.batch import BatchVerifier, BatchVerifierConfig

    if not model and not responses:
        raise EvalError("give --model to generate, or --responses FILE to re-score saved generations")
    problems = {b: load_benchmark(b, data_dir, limit) for b in benchmarks}
    store = Path(responses or save_responses) if (responses or save_responses) else None
    if store and not responses:
        drop_partial_tail(store)
    records = read_records(store) if store else []
    if model and not responses:
        be = make_backend(model, backend)
        mem: list[dict] = []
        if store:
            store.parent.mkdir(parents=True, exist_ok=True)
        fh = store.open("a") if store else None

        def sink(rec: dict) -> None:
            mem.append(rec)
            if fh:
                fh.write(json.dumps(rec) + "\n")
                fh.flush()

        try:
            for b in benchmarks:
                done = {(r["id"], r["sample"]) for r in records if r.get("benchmark", b) == b}
                generate_records(be, b, problems[b], settings, done, sink)
        finally:
            if fh:
                fh.close()
        records += mem
    report = {"model": model, "responses": str(store) if store else None, "strategy": settings.strategy,
              "n": settings.n if settings.strategy != "greedy" else 1, "settings": vars(settings), "benchmarks": {}}
    with BatchVerifier(BatchVerifierConfig(workers=verifier_workers)) as verifier:
        for b in benchmarks:
            recs = [r for r in records if r.get("benchmark", b) == b]
            ids = {p.id for p in problems[b]}
            recs = [r for r in recs if r["id"] in ids] if limit else recs
            report["benchmarks"][b] = score_records(recs, problems[b], settings.strategy, report["n"], verifier.verify)
    if baseline:
        base = json.loads(Path(baseline).read_text())
        report["baseline"] = baseline
        for b, m in report["benchmarks"].items():
            bm = base["benchmarks"].get(b)
            tok_key = "completion_tokens_mean"
            if bm and bm.get(tok_key) and m.get(tok_key) is not None:
                m["aes_vs_baseline"] = accuracy_efficiency_score(m["accuracy"], m[tok_key], bm["accuracy"], bm[tok_key])
    return report
