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
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rl.data.problems import DataConfig, Problem, encode_prompts, load_problems
from rl.evaluation.scoring import EvalError, accuracy_efficiency_score, load_report, score_records
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
        rec.update(plan=list(gen.plan), prompt_tokens=len(gen.prompt_ids))
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


def read_baseline(path: str) -> dict:
    if not Path(path).exists():
        raise EvalError(f"--baseline {path}: file not found")
    try:
        return load_report(Path(path))
    except EvalError as e:
        raise EvalError(f"--baseline {e}") from None


# ---------------------------------------------------------------------------------- driver


def make_backend(model: str, backend: str, routers: str | None = None):
    """The generation backend for ``--model`` (a local folder, a hub id, or ``tiny``); ``routers``:
    a folder with ``routers.safetensors`` (routed generation: the HF backend, or the routed vLLM
    model, ``rl.evaluation.routed_vllm``)."""
    from rl.models.tiny_reasoner import resolve_model_path

    local = model.startswith(("/", "./", "../", "~")) or model.endswith("/") or model.count("/") > 1
    if local and not Path(model).expanduser().exists():
        raise EvalError(f"--model {model}: no such folder")
    if Path(model).expanduser().is_dir() and not (Path(model).expanduser() / "config.json").exists():
        raise EvalError(f"--model {model}: not a model folder (no config.json)")
    if routers is not None:
        if not (Path(routers) / "routers.safetensors").exists():
            raise EvalError(f"--routers {routers}: no routers.safetensors there (exitrl routers train writes it)")
    path = resolve_model_path(model)
    try:
        if backend == "vllm" and routers is not None:
            from rl.evaluation.routed_vllm import RoutedVLLMEval

            if not Path(path).is_dir():
                raise EvalError(f"--routers with --backend vllm: --model {model} must be a local model folder")
            return RoutedVLLMEval(str(path), routers)
        if backend == "vllm":
            from rollout.backends.vllm import VLLMBackend

            return VLLMBackend.from_pretrained(path)
        from rollout.backends.hf import HFBackend

        return HFBackend.from_pretrained(path, routers=routers)
    except OSError as e:  # transformers: not found locally or on the hub
        raise EvalError(f"--model {model}: cannot load ({str(e).splitlines()[0]})") from None
    except ValueError as e:  # routers built for another depth
        raise EvalError(f"--routers {routers}: {e}") from None


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
    routed = getattr(backend, "routed", None)
    if routed is not None:
        rc = routed.routers.config
        usage["layer_flops_ratio"] = plan_flops_ratio(
            [r["plan"] for r in recs],
            [r.get("prompt_tokens", 0) for r in recs],
            [r["completion_tokens"] for r in recs],
            backend.model.config,
            rc.router_hidden,
            rc.num_windows,
        )
    return usage


def add_depth_report(report, backend, model, benchmarks, data_dir, limit, records) -> None:
    """``report["benchmarks"][b]["depth"]`` for each benchmark, with the backend's transformers model
    (HF backend) or the model loaded in transformers (vLLM backend: it exposes no layers)."""
    from rl.evaluation.depth import answer_depth, depth_sequences

    lm = getattr(backend, "model", None) if backend is not None else None
    tok = getattr(backend, "tokenizer", None) if backend is not None else None
    if lm is None or not hasattr(lm, "get_decoder"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from rl.models.tiny_reasoner import resolve_model_path

        path = resolve_model_path(model)
        lm = AutoModelForCausalLM.from_pretrained(path, torch_dtype="float32").eval()
        tok = AutoTokenizer.from_pretrained(path)
    for b in benchmarks:
        seqs = depth_sequences(
            tok, [r for r in records if r.get("benchmark", b) == b], load_benchmark(b, data_dir, limit)
        )
        report["benchmarks"][b]["depth"] = answer_depth(lm, seqs, pad_id=tok.pad_token_id or 0)


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


def run_eval(
    benchmarks: list[str],
    data_dir: str | None,
    settings: EvalSettings,
    model: str | None = None,
    backend: str = "vllm",
    responses: str | None = None,
    save_responses: str | None = None,
    limit: int | None = None,
    baseline: str | None = None,
    verifier_workers: int = 2,
    routers: str | None = None,
    router_biases: list[float] | None = None,
    depth_report: bool = False,
) -> dict:
    """``exitrl eval``: generate (or load) responses for each benchmark and score them; returns the report.
    ``depth_report``: per benchmark, how deep the answer tokens need the model (``rl.evaluation.depth``)."""
    from rewards.batch import BatchVerifier, BatchVerifierConfig

    if not model and not responses:
        raise EvalError("give --model to generate, or --responses FILE to re-score saved generations")
    if depth_report and not model:
        raise EvalError("--depth-report needs --model (it reads the model's layers)")
    check_settings(settings, limit)
    if responses and not Path(responses).is_file():
        raise EvalError(f"--responses {responses}: file not found")
    base = read_baseline(baseline) if baseline else None
    store = Path(responses or save_responses) if (responses or save_responses) else None
    if store and not responses:
        drop_partial_tail(store)
    records = read_records(store, resuming=not responses) if store else []
    if router_biases and not routers:
        raise EvalError("--router-bias needs --routers")
    if routers and backend == "vllm" and (router_biases or settings.strategy == "ffs"):
        raise EvalError("--routers with --backend vllm: --router-bias and --strategy ffs run on --backend hf")
    be = make_backend(model, backend, routers) if model and not responses else None
    scratch = None
    if depth_report and store is None:  # the depth report re-reads the responses: keep them somewhere
        scratch = tempfile.TemporaryDirectory()
    gen_store = store or (Path(scratch.name) / "responses.jsonl" if scratch else None)
    with BatchVerifier(BatchVerifierConfig(workers=verifier_workers)) as verifier:
        sink = gen_store if be else None
        report = evaluate(be, benchmarks, settings, data_dir, limit, verifier.verify, records, sink)
        if router_biases and be is not None:
            from rl.evaluation.router_curve import router_curve

            report["router_curve"] = router_curve(
                be, benchmarks, settings, router_biases, data_dir, limit, verifier.verify
            )
    if depth_report:
        add_depth_report(report, be, model, benchmarks, data_dir, limit, read_records(gen_store))
    if scratch is not None:
        scratch.cleanup()
    report = {"model": model, "responses": str(store) if store else None, **report}
    if base is not None:
        report["baseline"] = baseline
        for b, m in report["benchmarks"].items():
            bm = base["benchmarks"].get(b)
            tok_key = "completion_tokens_mean"
            if bm and bm.get(tok_key) and m.get(tok_key) is not None:
                m["aes_vs_baseline"] = accuracy_efficiency_score(m["accuracy"], m[tok_key], bm["accuracy"], bm[tok_key])
    return report
