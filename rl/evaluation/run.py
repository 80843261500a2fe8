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
from dataclasses import dataclass
from pathlib import Path

from rl.data.problems import DataConfig, Problem, encode_prompts, load_problems
from rl.evaluation.scoring import EvalError, score_records
from rollout.thinking import scored_text, think_tag_ids, thinking_span, thinking_tokens


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where a benchmark lives on the hub and how its rows read."""

    hub: str
    subset: str | None
    split: str
    problem_key: str
    answer_key: str
    answer_after_hashes: bool = False
    id_key: str | None = None
    choice_keys: tuple[str, ...] | None = None  # multiple choice: options, the correct one first

    def data_config(self, source: str | None = None, limit: int | None = None) -> DataConfig:
        return DataConfig(
            source=source or self.hub,
            subset=self.subset,
            split=self.split,
            problem_key=self.problem_key,
            answer_key=self.answer_key,
            id_key=self.id_key,
            answer_after_hashes=self.answer_after_hashes,
            choice_keys=list(self.choice_keys) if self.choice_keys else None,
            limit=limit,
        )


GPQA_CHOICES = ("Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")
HUB_BENCHMARKS = {
    "gsm8k": BenchmarkSpec("openai/gsm8k", "main", "test", "question", "answer", answer_after_hashes=True),
    "math500": BenchmarkSpec("HuggingFaceH4/MATH-500", None, "test", "problem", "answer"),
    "aime24": BenchmarkSpec("HuggingFaceH4/aime_2024", None, "train", "problem", "answer"),
    "aime25": BenchmarkSpec("yentinglin/aime_2025", None, "train", "problem", "answer"),
    "amc23": BenchmarkSpec("math-ai/amc23", None, "test", "question", "answer"),
    # the question alone has no gradable answer: the four options are listed (shuffled per item) and the letter graded
    "gpqa_diamond": BenchmarkSpec(
        "Idavidrein/gpqa",
        "gpqa_diamond",
        "train",
        "Question",
        "Correct Answer",
        id_key="Record ID",
        choice_keys=GPQA_CHOICES,
    ),
}
SYNTHETIC = "synthetic"


def load_benchmark(name: str, data_dir: str | None = None, limit: int | None = None) -> list[Problem]:
    """Local ``<data_dir>/<name>.jsonl`` when given (id, problem, answer; multiple-choice benchmarks
    in the hub's column layout), else the hub dataset; ``synthetic`` is the demo task's held-out set."""
    if name == SYNTHETIC:
        return load_problems(DataConfig(source="synthetic", split="test", limit=limit or 200))
    spec = HUB_BENCHMARKS.get(name)
    if data_dir:
        path = Path(data_dir) / f"{name}.jsonl"
        if not path.exists():
            layout = (
                f"the hub's columns {spec.problem_key!r}, {', '.join(spec.choice_keys)}"
                if spec and spec.choice_keys
                else "id, problem, answer"
            )
            raise EvalError(f"benchmark {name!r}: {path} not found (expected <data-dir>/<name>.jsonl with {layout})")
        if spec and spec.choice_keys:
            return load_problems(spec.data_config(str(path), limit))
        return load_problems(DataConfig(source=str(path), limit=limit))
    if spec is None:
        raise EvalError(
            f"unknown benchmark {name!r}; known: {sorted(HUB_BENCHMARKS) + [SYNTHETIC]} (or pass --data-dir)"
        )
    return load_problems(spec.data_config(limit=limit))


# ---------------------------------------------------------------------------------- generation


@dataclass
class EvalSettings:
    strategy: str = "greedy"
    n: int = 1
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 1024
    seed: int = 0
    chunk: int = 64  # prompts handed to the backend at once
    progress: bool = True
    prompt: DataConfig | None = None  # the recipe's prompt options (None: DataConfig's defaults)


def _token_record(tok, gen, open_id, close_id) -> dict:
    """A saved record; ``response`` is the text the verifier reads (``<think>`` prepended when the
    prompt opened the thinking, as R1-style templates do)."""
    ids = gen.completion_ids
    _, _, closed = thinking_span(ids, open_id, close_id)
    rec = {
        "response": scored_text(tok, gen.prompt_ids, ids),
        "completion_tokens": len(ids),
        "think_tokens": thinking_tokens(ids, open_id, close_id),
        "closed": closed,
        "finish_reason": gen.finish_reason,
    }
    if gen.plan is not None:
        rec["plan"] = list(gen.plan)
    rec["prompt_tokens"] = len(gen.prompt_ids)
    return rec


def generate_records(
    backend, bench: str, problems: list[Problem], s: EvalSettings, done: set[tuple[str, int]], sink
) -> int:
    """Generate what ``done`` lacks and append records through ``sink``; returns how many."""
    from tqdm import tqdm

    from rollout.ffs import first_finish_search
    from rollout.types import SamplingConfig

    tok = backend.tokenizer
    open_id, close_id = think_tag_ids(tok)
    samples = 1 if s.strategy == "greedy" else s.n
    todo = [p for p in problems if any((p.id, k) not in done for k in range(1 if s.strategy == "ffs" else samples))]
    if not todo:
        return 0
    prompts = encode_prompts(tok, todo, s.prompt or DataConfig())  # default: chat template + the math instruction
    temp = 0.0 if s.strategy == "greedy" else s.temperature
    written = 0
    chunk = s.chunk
    for c0 in tqdm(range(0, len(todo), chunk), desc=f"eval {bench}", mininterval=5, disable=not s.progress):
        ps, ids = todo[c0 : c0 + chunk], prompts[c0 : c0 + chunk]
        sampling = SamplingConfig(max_tokens=s.max_tokens, temperature=temp, top_p=s.top_p, n=samples, seed=s.seed + c0)
        if s.strategy == "ffs":
            for p, r in zip(ps, first_finish_search(backend, ids, sampling)):
                sink(
                    {
                        "benchmark": bench,
                        "id": p.id,
                        "sample": 0,
                        **_token_record(tok, r.winner, open_id, close_id),
                        "total_tokens": r.total_tokens,
                        "sequential_tokens": r.sequential_tokens,
                        "ffs_n": samples,
                    }
                )
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
            sink({"benchmark": bench, "id": p.id, "sample": k, **_token_record(tok, g, open_id, close_id)})
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


def read_records(path: Path, resuming: bool = False) -> list[dict]:
    """Saved records of ``path``; every bad line is an error naming the file and line, except (when
    ``resuming`` a generation) a last line cut by a kill mid-write, which is regenerated."""
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
            if resuming and n == len(lines):
                continue
            raise EvalError(f"{path}: line {n} is not valid JSON") from None
        if not isinstance(r, dict):
            raise EvalError(f"{path}: line {n}: expected a JSON object, got {type(r).__name__}")
        for key in ("id", "sample", "response"):
            if key not in r:
                raise EvalError(f"{path}: line {n}: missing field '{key}'")
        if not isinstance(r["response"], str):
            raise EvalError(f"{path}: line {n}: field 'response' must be a string, got {json.dumps(r['response'])}")
        if not isinstance(r["sample"], int) or isinstance(r["sample"], bool):
            raise EvalError(f"{path}: line {n}: field 'sample' must be an integer, got {json.dumps(r['sample'])}")
        r["id"] = str(r["id"])
        out.append(r)
    return out


def check_settings(settings: EvalSettings, limit: int | None) -> None:
    """Option values that cannot work, named as on the command line."""
    if settings.n < 1:
        raise EvalError(f"--n must be >= 1, got {settings.n}")
    if settings.strategy == "greedy" and settings.n != 1:
        raise EvalError(f"--n {settings.n} needs --strategy sample, majority or ffs (greedy gives one answer)")
    if settings.strategy in ("majority", "ffs") and settings.n < 2:
        raise EvalError(f"--strategy {settings.strategy} needs --n >= 2, got {settings.n}")
    if settings.max_tokens <= 0:
        raise EvalError(f"--max-tokens must be > 0, got {settings.max_tokens}")
    if not settings.temperature >= 0:
        raise EvalError(f"--temperature must be >= 0, got {settings.temperature}")
    if settings.strategy in ("sample", "majority", "ffs") and settings.temperature == 0:
        raise EvalError(f"--strategy {settings.strategy} samples: --temperature must be > 0")
    if not 0 < settings.top_p <= 1:
        raise EvalError(f"--top-p must be in (0, 1], got {settings.top_p}")
    if limit is not None and limit <= 0:
        raise EvalError(f"--limit must be > 0, got {limit}")


# ---------------------------------------------------------------------------------- driver


def evaluate(
    backend,
    benchmarks: list[str] | dict[str, list[Problem]],
    settings: EvalSettings,
    data_dir: str | None = None,
    limit: int | None = None,
    verify_many=None,
    records: list[dict] | None = None,
    store: Path | None = None,
) -> dict:
    """Generate what ``records`` lacks with ``backend`` (appending to ``store`` when given) and score
    every benchmark (names, or name -> problems already loaded): the one evaluation path of
    ``exitrl eval``, the demo and the trainer's held-out evaluation. ``verify_many`` defaults to an
    isolated batch verifier started for this call."""
    from rewards.batch import BatchVerifier, BatchVerifierConfig

    if isinstance(benchmarks, dict):
        problems, benchmarks = benchmarks, list(benchmarks)
    else:
        problems = {b: load_benchmark(b, data_dir, limit) for b in benchmarks}
    records = list(records or [])
    if backend is not None:
        records += generate_all(backend, problems, settings, records, store)
    n = settings.n if settings.strategy != "greedy" else 1
    report = {"strategy": settings.strategy, "n": n, "settings": vars(settings), "benchmarks": {}}
    verifier = None if verify_many else BatchVerifier(BatchVerifierConfig(workers=2))
    try:
        for b in benchmarks:
            ids = {p.id for p in problems[b]}
            recs = [r for r in records if r.get("benchmark", b) == b and (not limit or r["id"] in ids)]
            report["benchmarks"][b] = score_records(
                recs, problems[b], settings.strategy, n, verify_many or verifier.verify
            )
            if any(r.get("plan") is not None for r in recs):
                report["benchmarks"][b]["layers"] = routed_compute(backend, recs)
            flops = flops_per_problem(backend, recs, len(problems[b])) if backend is not None else None
            if flops is not None:
                report["benchmarks"][b]["flops_per_problem"] = flops
    finally:
        if verifier is not None:
            verifier.close()
    return report


def routed_compute(backend, recs: list[dict]) -> dict:
    """Layer usage of routed records; the layer-FLOPs ratio when the backend's model is at hand."""
    from rl.evaluation.scoring import layer_usage
    from rollout.routing.compute import plan_flops_ratio

    recs = [r for r in recs if r.get("plan") is not None]
    usage = layer_usage([r["plan"] for r in recs])
    shape, config = backend.router_shape, backend.model_config
    if shape is not None and config is not None:
        usage["layer_flops_ratio"] = plan_flops_ratio(
            [r["plan"] for r in recs],
            [r.get("prompt_tokens", 0) for r in recs],
            [r["completion_tokens"] for r in recs],
            config,
            *shape,
        )
    return usage


def record_flops(config, rec: dict, router_shape) -> float:
    """Forward FLOPs of one saved record (``rollout.routing.compute.generation_flops``); an FFS
    record is its ``ffs_n`` samples at their mean length (``total_tokens`` / n), each with its prompt."""
    from rollout.routing.compute import generation_flops

    plan = rec.get("plan")
    shape = router_shape if plan is not None else None
    if rec.get("ffs_n"):
        n = rec["ffs_n"]
        return n * generation_flops(config, rec["prompt_tokens"], round(rec["total_tokens"] / n), plan, shape)
    return generation_flops(config, rec["prompt_tokens"], rec["completion_tokens"], plan, shape)


def flops_per_problem(backend, recs: list[dict], n_problems: int) -> float | None:
    """Forward FLOPs spent per problem (every sample of it), from the backend's model config; None
    when the config or the records' prompt lengths are not at hand (re-scored old records)."""
    config = backend.model_config
    if config is None or not recs or n_problems == 0 or any("prompt_tokens" not in r for r in recs):
        return None
    return sum(record_flops(config, r, backend.router_shape) for r in recs) / n_problems


def generate_all(
    backend, problems: dict[str, list[Problem]], settings: EvalSettings, records: list[dict], store: Path | None
) -> list[dict]:
    """New records for every benchmark (those in ``records`` are kept), appended to ``store`` as they come."""
    new: list[dict] = []
    if store:
        store.parent.mkdir(parents=True, exist_ok=True)
    fh = store.open("a") if store else None

    def sink(rec: dict) -> None:
        new.append(rec)
        if fh:
            fh.write(json.dumps(rec) + "\n")
            fh.flush()

    try:
        for b, probs in problems.items():
            done = {(r["id"], r["sample"]) for r in records if r.get("benchmark", b) == b}
            generate_records(backend, b, probs, settings, done, sink)
    finally:
        if fh:
            fh.close()
    return new
