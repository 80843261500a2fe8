"""``exitrl demo``: the tiny reasoner, baseline -> S-GRPO -> routers (two-stage) -> joint (``rl.demo``)."""

from __future__ import annotations

import argparse


def demo_config(args: argparse.Namespace):
    """The ``rl.demo.DemoConfig`` of the parsed command line."""
    from rl.demo import DemoConfig

    return DemoConfig(
        out=args.out,
        n_eval=args.n_eval,
        seed=args.seed,
        compare=args.compare,
        steps=args.steps,
        overrides=args.overrides,
        routers=args.routers,
        oracle=args.oracle,
        joint=args.joint,
        task=args.task,
    )


def run(args: argparse.Namespace) -> int:
    from rl.demo import run_demo
    from rl.demo_seeds import run_seeds

    cfg = demo_config(args)
    if args.seeds:
        run_seeds(cfg, [int(k) for k in args.seeds.split(",")])
    else:
        run_demo(cfg)
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
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
    d.add_argument(
        "--joint",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="after the routers on the S-GRPO policy (two-stage), joint training of policy and routers from there "
        "(summary.json's `joint`, `two_stage`, `joint_claim`; layers/joint.png). --no-joint: stop at two-stage",
    )
    d.add_argument(
        "--oracle", action="store_true", help="the exit oracle's shortest correct thinking (implied by --compare)"
    )
    d.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    d.add_argument(
        "--task",
        default="redundant",
        choices=["redundant", "recheck"],
        help="the synthetic task: 'redundant' (every thought after the steps is redundant) or 'recheck' (the "
        "thinking opens with a one-line first pass that the steps re-check; with --compare, the race adds GRPO "
        "with a length penalty, the forced-budget front and underthinking; the layer stages sit it out)",
    )
    d.add_argument(
        "--routers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="both levels on the 8-layer tiny reasoner: S-GRPO, then routers labelled and trained on its policy "
        "(summary.json's `routers`, `two_stage`, `static_plan`), then joint. --no-routers: the token level "
        "alone, on the 4-layer reasoner",
    )
    d.add_argument("overrides", nargs="*", help="key=value overrides of configs/tiny_sgrpo.yaml")
    d.set_defaults(fn=run)
    return d
