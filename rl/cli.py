"""The ``exitrl`` console script."""

from __future__ import annotations

import argparse
import json
import sys


def _demo(args) -> int:
    from rl.demo import run_demo

    run_demo(args.out, n_eval=args.n_eval, compare=args.compare, steps=args.steps, overrides=args.overrides)
    return 0


def _train(args) -> int:
    from rl.train import main

    return main([args.recipe, *args.overrides])


def _bench_logprob(args) -> int:
    from kernels.benchmark import main

    report = main(n=args.n, v=args.vocab, d=args.d, dtype=args.dtype, repeats=args.repeats)
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))
    return 0


def _bench_rewards(args) -> int:
    from rewards.benchmark import main

    report = main(n=args.n, workers=args.workers)
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="exitrl", description="RL that teaches reasoning models when to stop thinking")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="tiny reasoner: baseline, S-GRPO training, evaluation, summary.json + plot")
    d.add_argument("--out", default="runs/demo", help="output directory (summary.json)")
    d.add_argument("--n-eval", type=int, default=200, help="held-out problems to evaluate")
    d.add_argument("--compare", action="store_true", help="also GRPO on the same budget and the loss-mask ablation (up to an hour)")
    d.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    d.add_argument("overrides", nargs="*", help="key=value overrides of configs/tiny_sgrpo.yaml")
    d.set_defaults(fn=_demo)

    t = sub.add_parser("train", help="S-GRPO / GRPO training from a YAML recipe (accelerate launch -m rl.train for multi-GPU)")
    t.add_argument("recipe", help="configs/<recipe>.yaml")
    t.add_argument("overrides", nargs="*", help="key=value overrides, dotted for nested fields")
    t.set_defaults(fn=_train)

    b = sub.add_parser("bench", help="benchmarks, side by side against the usual baseline")
    bsub = b.add_subparsers(dest="bench", required=True)
    lp = bsub.add_parser("logprob", help="fused log-prob vs naive full logits vs TRL selective_log_softmax")
    lp.add_argument("--n", type=int, default=1024, help="tokens")
    lp.add_argument("--vocab", type=int, default=151936, help="vocabulary size")
    lp.add_argument("--d", type=int, default=1024, help="hidden size")
    lp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    lp.add_argument("--repeats", type=int, default=2)
    lp.add_argument("--json", action="store_true", help="print one JSON object")
    lp.set_defaults(fn=_bench_logprob)
    rw = bsub.add_parser("rewards", help="verified items per second and worst-case latency of the batch verifier")
    rw.add_argument("--n", type=int, default=10000, help="responses to verify")
    rw.add_argument("--workers", type=int, default=2)
    rw.add_argument("--json", action="store_true", help="print one JSON object")
    rw.set_defaults(fn=_bench_rewards)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
