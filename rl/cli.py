"""The ``exitrl`` console script."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _print_report(report: dict, one_line: bool) -> int:
    """A benchmark's report: one JSON object (``--json``) or indented."""
    print(json.dumps(report) if one_line else json.dumps(report, indent=2))
    return 0


def recipe_fields_help() -> str:
    """Every recipe field with its type, default and help string (for ``exitrl train --help``)."""
    from rl.trainer.config import TrainConfig
    from rl.trainer.config_loading import describe_fields

    return "recipe fields (YAML keys; override as dotted key=value):\n" + "\n".join(describe_fields(TrainConfig))


def _demo(args) -> int:
    from rl.demo import run_demo, run_seeds

    kwargs = {
        "n_eval": args.n_eval,
        "compare": args.compare,
        "steps": args.steps,
        "overrides": args.overrides,
        "routers": args.routers,
        "oracle": args.oracle,
        "ablation": args.ablation,
        "joint": args.joint,
    }
    if args.seeds:
        run_seeds(args.out, [int(k) for k in args.seeds.split(",")], **kwargs)
    else:
        run_demo(args.out, seed=args.seed, **kwargs)
    return 0


def _export(args) -> int:
    from rl.serving.export import ExportError, export

    try:
        out = export(
            args.source,
            args.out,
            dtype=args.dtype,
            adapter=args.adapter,
            routers=args.routers,
            with_routers=not args.no_routers,
        )
    except ExportError as e:
        print(f"exitrl export: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.source} -> {out} (vllm serve {out}, or exitrl serve {out})")
    return 0


def _serve(args) -> int:
    from rl.serving.export import ExportError
    from rl.serving.server import ServeConfig, serve

    cfg = ServeConfig(
        model_dir=args.model_dir,
        host=args.host,
        port=args.port,
        served_model_name=args.served_model_name,
        max_model_len=args.max_model_len,
        vllm_args=args.vllm_args or [],
        request_timeout_s=args.request_timeout,
    )
    try:
        return serve(cfg)
    except (ExportError, ValueError) as e:
        print(f"exitrl serve: {e}", file=sys.stderr)
        return 2


def _train(args) -> int:
    from rl.trainer.loop import main

    return main([args.recipe, *args.overrides])


def _bench_logprob(args) -> int:
    from rl.bench.logprob import main

    report = main(n=args.n, v=args.vocab, d=args.d, dtype=args.dtype, repeats=args.repeats, entropy=not args.no_entropy)
    return _print_report(report, args.json)


def _bench_rewards(args) -> int:
    from rl.bench.rewards import main

    report = main(n=args.n, workers=args.workers)
    return _print_report(report, args.json)


def _bench_report(name: str, run, as_json: bool, errors: tuple[type[Exception], ...]) -> int:
    """Run one bench; a refused input (``errors``) is one line naming it, exit 2."""
    try:
        report = run()
    except errors as e:
        print(f"exitrl bench {name}: {e}", file=sys.stderr)
        return 2
    return _print_report(report, as_json)


def _bench_rollout(args) -> int:
    from rl.bench.rollout import main

    def run():
        return main(
            n_prompts=args.prompts,
            exits=args.exits,
            backend=args.backend,
            max_tokens=args.max_tokens,
            block_size=args.block_size,
            compiled=args.compiled,
            repeats=args.repeats,
            profile=args.profile,
        )

    return _bench_report("rollout", run, args.json, (ValueError,))


def _eval(args) -> int:
    from rl.evaluation.report import markdown_table, write_reports
    from rl.evaluation.run import EvalSettings, run_eval
    from rl.evaluation.scoring import EvalError

    settings = EvalSettings(
        strategy=args.strategy,
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        max_tokens=args.max_tokens,
        seed=args.seed,
    )
    try:
        report = run_eval(
            [b.strip() for b in args.benchmarks.split(",") if b.strip()],
            args.data_dir,
            settings,
            model=args.model,
            backend=args.backend,
            responses=args.responses,
            save_responses=args.save_responses,
            limit=args.limit,
            baseline=args.baseline,
            routers=args.routers,
            router_biases=[float(x) for x in args.router_bias.split(",")] if args.router_bias else None,
            depth_report=args.depth_report,
        )
    except EvalError as e:
        print(f"exitrl eval: {e}", file=sys.stderr)
        return 2
    if args.out:
        write_reports(report, args.out, name=args.name)
    if args.json:
        print(json.dumps(report))
    else:
        print(markdown_table({args.name: report}))
    return 0


def _eval_compare(argv: list[str]) -> int:
    from rl.evaluation.report import compare

    p = argparse.ArgumentParser(prog="exitrl eval compare", description="side-by-side table of saved eval reports")
    p.add_argument("runs", nargs="+", help="report.json files or --out folders of exitrl eval")
    p.add_argument("--plot", default=None, help="also write accuracy-vs-tokens PNG here")
    a = p.parse_args(argv)
    try:
        print(compare(a.runs, a.plot))
    except (FileNotFoundError, ValueError) as e:
        print(f"exitrl eval compare: {e}", file=sys.stderr)
        return 2
    return 0


def _bench_serve(args) -> int:
    from rl.bench.serve import main

    report = main(
        url=args.url,
        model=args.model,
        n_prompts=args.prompts,
        concurrency=args.concurrency,
        k=args.k,
        max_tokens=args.max_tokens,
        with_load_tool=not args.no_load_tool,
        load_requests=args.load_requests,
        load_concurrency=args.load_concurrency,
        api_key=os.environ.get("EXITRL_API_KEY"),
        tokenizer=args.tokenizer,
    )
    return _print_report(report, args.json)


def _bench_trainer(args) -> int:
    from rl.bench.trainer import main

    report = main(
        prompts=args.prompts,
        group=args.group,
        max_tokens=args.max_tokens,
        steps=args.steps,
        profile=args.profile,
        backend=args.backend,
    )
    return _print_report(report, args.json)


def _routers(args) -> int:
    from rl.routing.pipeline import RoutersRecipe, run_label, run_train
    from rl.trainer.config_loading import ConfigError, load_config

    try:
        recipe = load_config(RoutersRecipe, args.recipe, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"exitrl routers: {e}", file=sys.stderr)
        return 2
    try:
        if args.routers_command == "label":
            result = run_label(recipe, args.out)
        else:
            result = run_train(recipe, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"exitrl routers {args.routers_command}: {e}", file=sys.stderr)
        return 2
    return _print_report(result, args.json)


def _bench_routed(args) -> int:
    from rl.bench.routed import main

    def run():
        return main(
            model=args.model,
            routers=args.routers,
            n_prompts=args.prompts,
            max_tokens=args.max_tokens,
            backend=args.backend,
        )

    return _bench_report("routed", run, args.json, (FileNotFoundError,))


def _bench_exit_head(args) -> int:
    from rl.bench.exit_head import main

    shapes = tuple(x.strip() for x in args.shapes.split(",") if x.strip())
    return _print_report(main(shapes=shapes, device=args.device, repeats=args.repeats), args.json)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="exitrl", description="RL that teaches reasoning models when to stop thinking")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="tiny reasoner: baseline, S-GRPO training, evaluation, summary.json + plot")
    d.add_argument("--out", default="runs/demo", help="output directory (summary.json)")
    d.add_argument("--n-eval", type=int, default=1000, help="held-out problems to evaluate")
    d.add_argument("--seed", type=int, default=0, help="recipe seed: the tiny model's build and the training run")
    d.add_argument(
        "--seeds", default=None, help="comma-separated seeds, each built and trained from scratch into OUT/seed-K"
    )
    d.add_argument(
        "--compare",
        action="store_true",
        help="also GRPO and FFS groups on S-GRPO's rollout-token budget and the exit oracle (about 45 minutes)",
    )
    d.add_argument("--ablation", action="store_true", help="also the loss-mask ablation (prefix_exit_answer)")
    d.add_argument(
        "--joint",
        action="store_true",
        help="after the layer stage, joint training against two-stage on the 8-layer reasoner (summary.json's "
        "`joint`, `two_stage`; layers/joint.png; about 35 more minutes on 2 cores)",
    )
    d.add_argument(
        "--oracle", action="store_true", help="the exit oracle's shortest correct thinking (implied by --compare)"
    )
    d.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    d.add_argument(
        "--routers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the layer-level stage: the 8-layer tiny reasoner, router labels, routers, routed held-out "
        "evaluation (summary.json's `routers` object; about 11 minutes). --no-routers: the token level alone",
    )
    d.add_argument("overrides", nargs="*", help="key=value overrides of configs/tiny_sgrpo.yaml")
    d.set_defaults(fn=_demo)

    x = sub.add_parser("export", help="a run / checkpoint / model folder -> a folder plain `vllm serve` loads")
    x.add_argument("source", help="run folder (its last checkpoint), checkpoints/step-N, or a model folder")
    x.add_argument("out", help="new folder to write")
    x.add_argument("--dtype", default="bfloat16", help="bfloat16 | float16 | float32")
    x.add_argument("--adapter", action="store_true", help="keep a LoRA adapter separate (serve with --enable-lora)")
    x.add_argument(
        "--routers",
        default=None,
        help="layer routers to serve with the model (`exitrl routers train` output); a joint run's checkpoint "
        "brings its own. The export then runs as the routed vLLM model",
    )
    x.add_argument(
        "--no-routers",
        action="store_true",
        help="export the policy alone, as a plain model (a joint run's routers left out)",
    )
    x.set_defaults(fn=_export)

    sv = sub.add_parser(
        "serve",
        help="vllm serve on a private socket + a front end with FFS (ffs_n) and thinking budgets; "
        "exits 0 on SIGTERM/SIGINT, 1 if vLLM fails or dies, 2 on bad arguments",
    )
    sv.add_argument("model_dir", help="an exitrl export")
    sv.add_argument("--host", default="127.0.0.1", help="bind address (beyond loopback needs $EXITRL_API_KEY)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--served-model-name", default=None)
    sv.add_argument("--max-model-len", type=int, default=2048)
    sv.add_argument(
        "--request-timeout", type=float, default=600.0, help="seconds to wait for vLLM's next bytes (then 504)"
    )
    sv.add_argument(
        "--vllm-args",
        nargs=argparse.REMAINDER,
        help="engine options passed on to vllm serve (not --host/--port/--uds/--api-key/--middleware ...: "
        "the upstream stays on a private socket)",
    )
    sv.set_defaults(fn=_serve)

    t = sub.add_parser(
        "train",
        help="S-GRPO / GRPO training from a YAML recipe (accelerate launch -m rl.train for multi-GPU)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=recipe_fields_help(),
    )
    t.add_argument("recipe", help="configs/<recipe>.yaml")
    t.add_argument("overrides", nargs="*", help="key=value overrides, dotted for nested fields")
    t.set_defaults(fn=_train)

    e = sub.add_parser(
        "eval", help="accuracy and efficiency on math benchmarks ('exitrl eval compare A B' for a table)"
    )
    e.add_argument("--model", default=None, help="model dir or hub id ('tiny' = the embedded tiny reasoner)")
    e.add_argument(
        "--benchmarks",
        default="gsm8k",
        help="comma list: gsm8k,math500,aime24,aime25,amc23,gpqa_diamond,synthetic,smoke",
    )
    e.add_argument("--data-dir", default=None, help="folder of local <name>.jsonl files (id, problem, answer)")
    e.add_argument("--strategy", default="greedy", choices=["greedy", "sample", "majority", "ffs"])
    e.add_argument("--n", type=int, default=1, help="samples per problem (sample / majority / ffs)")
    e.add_argument("--backend", default="vllm", choices=["vllm", "hf"])
    e.add_argument("--temperature", type=float, default=0.6)
    e.add_argument("--top-p", type=float, default=0.95)
    e.add_argument("--max-tokens", type=int, default=1024)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark")
    e.add_argument("--responses", default=None, help="re-score this saved-responses JSONL (no model needed)")
    e.add_argument("--save-responses", default=None, help="append generations here; rerunning resumes from it")
    e.add_argument("--baseline", default=None, help="a baseline report.json: adds the accuracy-efficiency score")
    e.add_argument("--routers", default=None, help="a routers folder (exitrl routers train): routed generation")
    e.add_argument(
        "--router-bias",
        default=None,
        help="comma list of skip-logit biases: traces accuracy vs layers (router_curve, accuracy_vs_layers.png)",
    )
    e.add_argument("--out", default=None, help="write report.json, report.md and PNG plots here")
    e.add_argument("--name", default="run", help="run name in tables")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(fn=_eval)

    e.add_argument(
        "--depth-report",
        action="store_true",
        help="per benchmark: the earliest layer at which each answer token becomes (and stays) the exit "
        "head's top-1 (report.json 'depth', answer_depth.png)",
    )
    r = sub.add_parser("routers", help="Dr.LLM layer routers: search labels, train routers")
    rsub = r.add_subparsers(dest="routers_command", required=True)
    for name, text in (
        ("label", "search layer configurations per problem (labels.jsonl, resumable; label_stats.json)"),
        ("train", "train routers on the labels (OUT/routers: routers.safetensors, train_metrics.json)"),
    ):
        rp = rsub.add_parser(name, help=text)
        rp.add_argument("--recipe", default="configs/routers/tiny_deep.yaml", help="router recipe YAML")
        rp.add_argument("--out", default="runs/routers", help="folder of labels.jsonl and routers/")
        rp.add_argument("--json", action="store_true", help="print one JSON object")
        rp.add_argument("overrides", nargs="*", help="key=value overrides (dotted: label.budget=4)")
        rp.set_defaults(fn=_routers)

    b = sub.add_parser("bench", help="benchmarks, side by side against the usual baseline")
    bsub = b.add_subparsers(dest="bench", required=True)
    lp = bsub.add_parser(
        "logprob", help="fused policy loss / fused log-prob vs naive full logits vs TRL selective_log_softmax"
    )
    lp.add_argument(
        "--n", type=int, default=2048, help="tokens (the fused tile is fixed, so mem_ratio halves as N doubles)"
    )
    lp.add_argument("--vocab", type=int, default=151936, help="vocabulary size")
    lp.add_argument("--d", type=int, default=1024, help="hidden size")
    lp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    lp.add_argument(
        "--no-entropy",
        action="store_true",
        help="leave out the per-token entropy the trainer logs (the full-logits paths then skip it)",
    )
    lp.add_argument("--repeats", type=int, default=2, help="timed rounds (after one warm-up round); medians reported")
    lp.add_argument("--json", action="store_true", help="print one JSON object")
    lp.set_defaults(fn=_bench_logprob)
    rw = bsub.add_parser("rewards", help="verified items per second and worst-case latency of the batch verifier")
    rw.add_argument("--n", type=int, default=10000, help="responses to verify")
    rw.add_argument("--workers", type=int, default=2)
    rw.add_argument("--json", action="store_true", help="print one JSON object")
    rw.set_defaults(fn=_bench_rewards)
    ro = bsub.add_parser("rollout", help="serial groups (1 full + m exits) vs parallel groups of m+1 full rollouts")
    ro.add_argument(
        "--prompts",
        type=int,
        default=128,
        help="prompts (the issue asks >= 64; 128 keeps per-step overhead from dominating on CPU)",
    )
    ro.add_argument("--exits", type=int, default=4, help="m")
    ro.add_argument("--backend", default="vllm", choices=["vllm", "hf"])
    ro.add_argument("--max-tokens", type=int, default=320)
    ro.add_argument("--block-size", type=int, default=None, help="vLLM KV block size (default: the backend's)")
    ro.add_argument(
        "--compiled",
        action="store_true",
        help="vLLM with torch.compile (enforce_eager=False; ~25 s more start-up on CPU) instead of eager",
    )
    ro.add_argument(
        "--repeats", type=int, default=5, help="interleaved repeats of the timed runs; wall times are their medians"
    )
    ro.add_argument(
        "--profile",
        action="store_true",
        help="vLLM: each arm once more with the engine's stages clocked (add_request, schedule, forward, ...) and "
        "the serial group with block-aligned cuts; HF: the branch phase as one padded batch vs in buckets",
    )
    ro.add_argument("--json", action="store_true", help="print one JSON object")
    ro.set_defaults(fn=_bench_rollout)
    tr = bsub.add_parser(
        "trainer", help="one training step and peak memory: ours vs TRL GRPOTrainer (same model, batch, group)"
    )
    tr.add_argument("--prompts", type=int, default=8)
    tr.add_argument("--group", type=int, default=5)
    tr.add_argument("--max-tokens", type=int, default=256)
    tr.add_argument("--steps", type=int, default=4, help="steps run (the first is warm-up, not timed)")
    tr.add_argument(
        "--profile", action="store_true", help="add a torch.profiler breakdown of the second step per stage"
    )
    tr.add_argument(
        "--backend", default="hf", choices=["hf", "vllm"], help="generation for both: HF, or a colocated vLLM engine"
    )
    tr.add_argument("--json", action="store_true", help="print one JSON object")
    tr.set_defaults(fn=_bench_trainer)
    rb = bsub.add_parser("routed", help="routed (grouped) generation vs the full model on the same prompts")
    rb.add_argument("--model", default="tiny-deep", help="model folder ('tiny-deep': the 8-layer tiny reasoner)")
    rb.add_argument("--routers", default=None, help="routers folder (default: runs/routers/routers)")
    rb.add_argument("--prompts", type=int, default=64)
    rb.add_argument("--max-tokens", type=int, default=200)
    rb.add_argument(
        "--backend",
        default="hf",
        choices=["hf", "vllm"],
        help="hf: the transformers routed model vs the full model; vllm: the routed export vs the plain export",
    )
    rb.add_argument("--json", action="store_true", help="print one JSON object")
    rb.set_defaults(fn=_bench_routed)
    eh = bsub.add_parser(
        "exit-head", help="fused layer read-outs vs per-layer full logits; batched routers vs a loop of routers"
    )
    eh.add_argument(
        "--shapes", default="tiny,large", help="comma-separated: tiny (d 128, V 384), large (d 1024, V 32k)"
    )
    eh.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    eh.add_argument("--repeats", type=int, default=3, help="timed rounds (after one warm-up round); medians reported")
    eh.add_argument("--json", action="store_true", help="print one JSON object")
    eh.set_defaults(fn=_bench_exit_head)
    se = bsub.add_parser(
        "serve",
        help="exitrl serve under load: plain vs FFS@k vs majority@k, then a mixed load (vLLM's load tool + FFS)",
    )
    se.add_argument("--url", default=None, help="a running exitrl serve (default: start one on the tiny reasoner)")
    se.add_argument("--model", default=None, help="served model name (default: the server's first)")
    se.add_argument("--tokenizer", default=None, help="with --url: the served model's folder (default: --model)")
    se.add_argument("--prompts", type=int, default=48)
    se.add_argument("--concurrency", type=int, default=4)
    se.add_argument("--k", type=int, default=4, help="samples for FFS and majority")
    se.add_argument("--max-tokens", type=int, default=400)
    se.add_argument("--no-load-tool", action="store_true", help="skip the mixed load run")
    se.add_argument(
        "--load-requests", type=int, default=64, help="mixed load: plain (vllm bench serve) and FFS requests, each"
    )
    se.add_argument("--load-concurrency", type=int, default=32, help="mixed load: concurrency of each kind")
    se.add_argument("--json", action="store_true")
    se.set_defaults(fn=_bench_serve)
    return p


def _pin_numerics_for_demo() -> None:
    """``exitrl demo`` from the shell re-runs itself under the tiny model build's pinned CPU numerics
    (``PINNED_NUMERICS``: set before torch loads), so its training and evaluation take the same code
    paths on any x86-64 machine with AVX2, as the build does."""
    import os

    if os.environ.get("EXITRL_PINNED") == "1":
        return
    from rl.models.numerics import PINNED_NUMERICS

    env = {**os.environ, **PINNED_NUMERICS, "EXITRL_PINNED": "1"}
    os.execve(sys.executable, [sys.executable, "-m", "rl.cli", *sys.argv[1:]], env)


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["demo"]:
        _pin_numerics_for_demo()
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["eval", "compare"]:
        return _eval_compare(argv[2:])
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
