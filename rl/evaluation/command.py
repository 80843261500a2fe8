"""``exitrl eval``: check the arguments, build the backend, evaluate, add the router curve, the depth
report and the comparison with a baseline report."""

from __future__ import annotations

import tempfile
from pathlib import Path

from rl.evaluation.router_curve import router_curve
from rl.evaluation.run import EvalSettings, check_settings, drop_partial_tail, evaluate, load_benchmark, read_records
from rl.evaluation.scoring import EvalError, accuracy_efficiency_score, load_report
from rollout.backends.base import RolloutBackend
from rollout.backends.factory import make_backend


def read_baseline(path: str) -> dict:
    if not Path(path).exists():
        raise EvalError(f"--baseline {path}: file not found")
    try:
        return load_report(Path(path))
    except EvalError as e:
        raise EvalError(f"--baseline {e}") from None


def eval_backend(model: str, backend: str, routers: str | None = None) -> RolloutBackend:
    """The generation backend for ``--model`` (a local folder, a hub id, or ``tiny``); ``routers``:
    a folder with ``routers.safetensors`` (routed generation: the HF backend, or the routed vLLM
    model deciding each prompt's plan in the engine)."""
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
    if backend == "vllm" and routers is not None and not Path(path).is_dir():
        raise EvalError(f"--routers with --backend vllm: --model {model} must be a local model folder")
    try:
        return make_backend(backend, str(path), routers=routers, decide_plans=routers is not None)
    except OSError as e:  # transformers: not found locally or on the hub
        raise EvalError(f"--model {model}: cannot load ({str(e).splitlines()[0]})") from None
    except ValueError as e:  # routers built for another depth
        raise EvalError(f"--routers {routers}: {e}") from None


def add_depth_report(report, backend, model, benchmarks, data_dir, limit, records) -> None:
    """``report["benchmarks"][b]["depth"]`` for each benchmark, with the backend's transformers model
    (HF backend) or the model loaded in transformers (vLLM backend: it exposes no layers)."""
    from rl.evaluation.depth import answer_depth, depth_sequences

    lm = backend.local_model if backend is not None else None
    tok = backend.tokenizer if backend is not None else None
    if lm is None:
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


def budget_fronts(be, benchmarks, settings, budgets, data_dir, limit, verifier) -> dict[str, list[dict]]:
    """``rl.evaluation.budget_front.budget_front`` on each benchmark, with the run's prompts and length limit."""
    from rl.evaluation.budget_front import budget_front

    return {
        b: budget_front(
            be,
            load_benchmark(b, data_dir, limit),
            budgets,
            verifier.verify,
            max_tokens=settings.max_tokens,
            prompt=settings.prompt,
            progress=settings.progress,
        )
        for b in benchmarks
    }


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
    think_budgets: list[int] | None = None,
) -> dict:
    """``exitrl eval``: generate (or load) responses for each benchmark and score them; returns the report.
    ``depth_report``: per benchmark, how deep the answer tokens need the model (``rl.evaluation.depth``).
    ``think_budgets``: per benchmark, accuracy and thinking with the thinking cut at each budget
    (``rl.evaluation.budget_front``; ``report["budget_front"]``)."""
    from rewards.batch import BatchVerifier, BatchVerifierConfig

    if not model and not responses:
        raise EvalError("give --model to generate, or --responses FILE to re-score saved generations")
    if think_budgets and (not model or responses):
        raise EvalError("--think-budgets needs --model (it generates the budgeted answers)")
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
    be = eval_backend(model, backend, routers) if model and not responses else None
    scratch = None
    if depth_report and store is None:  # the depth report re-reads the responses: keep them somewhere
        scratch = tempfile.TemporaryDirectory()
    gen_store = store or (Path(scratch.name) / "responses.jsonl" if scratch else None)
    with BatchVerifier(BatchVerifierConfig(workers=verifier_workers)) as verifier:
        sink = gen_store if be else None
        report = evaluate(be, benchmarks, settings, data_dir, limit, verifier.verify, records, sink)
        if router_biases and be is not None:
            report["router_curve"] = router_curve(
                be, benchmarks, settings, router_biases, data_dir, limit, verifier.verify
            )
        if think_budgets and be is not None:
            report["budget_front"] = budget_fronts(be, benchmarks, settings, think_budgets, data_dir, limit, verifier)
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
