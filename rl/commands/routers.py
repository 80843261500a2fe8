"""``exitrl routers label`` / ``exitrl routers train``: Dr.LLM layer routers (``rl.routing.pipeline``)."""

from __future__ import annotations

import argparse

from rl.commands.output import print_report, refuse

SUBCOMMANDS = (
    ("label", "search layer configurations per problem (labels.jsonl, resumable; label_stats.json)"),
    ("train", "train routers on the labels (OUT/routers: routers.safetensors, train_metrics.json)"),
)


def run(args: argparse.Namespace) -> int:
    from rl.routing.pipeline import RoutersRecipe, run_label, run_train
    from rl.trainer.config_loading import ConfigError, load_config

    try:
        recipe = load_config(RoutersRecipe, args.recipe, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        return refuse("routers", e)
    try:
        if args.routers_command == "label":
            result = run_label(recipe, args.out)
        else:
            result = run_train(recipe, args.out)
    except (FileNotFoundError, ValueError) as e:
        return refuse(f"routers {args.routers_command}", e)
    return print_report(result, args.json)


def add_parser(sub) -> argparse.ArgumentParser:
    r = sub.add_parser("routers", help="Dr.LLM layer routers: search labels, train routers")
    rsub = r.add_subparsers(dest="routers_command", required=True)
    for name, text in SUBCOMMANDS:
        rp = rsub.add_parser(name, help=text)
        rp.add_argument("--recipe", default="configs/routers/tiny_deep.yaml", help="router recipe YAML")
        rp.add_argument("--out", default="runs/routers", help="folder of labels.jsonl and routers/")
        rp.add_argument("--json", action="store_true", help="print one JSON object")
        rp.add_argument("overrides", nargs="*", help="key=value overrides (dotted: label.budget=4)")
        rp.set_defaults(fn=run)
    return r
