"""``exitrl train``: S-GRPO / GRPO training from a YAML recipe (``rl.trainer.loop``)."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from rl.trainer.loop import run_recipe

    return run_recipe(args.recipe, args.overrides)


def add_parser(sub) -> argparse.ArgumentParser:
    from rl.trainer.loop import add_train_arguments, recipe_fields_help

    t = sub.add_parser(
        "train",
        help="S-GRPO / GRPO training from a YAML recipe (accelerate launch -m rl.train for multi-GPU)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=recipe_fields_help(),
    )
    add_train_arguments(t)
    t.set_defaults(fn=run)
    return t
