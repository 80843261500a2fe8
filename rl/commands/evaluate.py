"""``exitrl eval``: accuracy and efficiency on math benchmarks; ``exitrl eval compare``: a table of
saved reports (``rl.evaluation``)."""

from __future__ import annotations

import argparse
import json

from rl.commands.output import refuse


def run(args: argparse.Namespace) -> int:
    from rl.evaluation.budget_front import parse_budgets
    from rl.evaluation.command import run_eval
    from rl.evaluation.report import markdown_table, write_reports
    from rl.evaluation.run import EvalSettings
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
            think_budgets=parse_budgets(args.think_budgets) if args.think_budgets else None,
        )
    except EvalError as e:
        return refuse("eval", e)
    if args.out:
        write_reports(report, args.out, name=args.name)
    if args.json:
        print(json.dumps(report))
    else:
        print(markdown_table({args.name: report}))
        for b, front in (report.get("budget_front") or {}).items():
            print(budget_table(b, front))
    return 0


def budget_table(benchmark: str, front: list[dict]) -> str:
    lines = [f"| {benchmark}: think budget | accuracy | 95% CI | thinking tokens | forced |", "|---|---|---|---|---|"]
    for p in front:
        lo, hi = p["accuracy_ci95"]
        tag = "none" if p["budget"] is None else p["budget"]
        lines.append(
            f"| {tag} | {p['accuracy']:.3f} | [{lo:.3f}, {hi:.3f}] | {p['think_tokens']:.1f} "
            f"| {p['forced_share']:.2f} |"
        )
    return "\n".join(lines)


def add_parser(sub) -> argparse.ArgumentParser:
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
    e.add_argument(
        "--depth-report",
        action="store_true",
        help="per benchmark: the earliest layer at which each answer token becomes (and stays) the exit "
        "head's top-1 (report.json 'depth', answer_depth.png)",
    )
    e.add_argument(
        "--think-budgets",
        default=None,
        help="comma list of thinking budgets (e.g. 0,16,32,64): per budget, the thinking cut there and closed "
        "with the exit prompt the serial groups use, accuracy and mean thinking (report.json 'budget_front', "
        "budget_front.png): the accuracy-length front with no training",
    )
    e.set_defaults(fn=run)
    return e


def compare_parser() -> argparse.ArgumentParser:
    """``exitrl eval compare``'s own parser (``rl.cli`` hands it everything after ``eval compare``)."""
    p = argparse.ArgumentParser(prog="exitrl eval compare", description="side-by-side table of saved eval reports")
    p.add_argument("runs", nargs="+", help="report.json files or --out folders of exitrl eval")
    p.add_argument("--plot", default=None, help="also write accuracy-vs-tokens PNG here")
    return p


def run_compare(argv: list[str]) -> int:
    from rl.evaluation.report import compare

    a = compare_parser().parse_args(argv)
    try:
        print(compare(a.runs, a.plot))
    except (FileNotFoundError, ValueError) as e:
        return refuse("eval compare", e)
    return 0
