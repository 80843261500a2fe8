"""The ``exitrl`` console script: one parser per command (``rl.commands``), composed here."""

from __future__ import annotations

import argparse
import os
import sys

from rl.commands import bench, demo, evaluate, export, routers, serve, train

__all__ = ["build_parser", "main"]

# the order `exitrl --help` lists them in
COMMANDS = (demo, export, serve, train, evaluate, routers, bench)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="exitrl", description="RL that teaches reasoning models when to stop thinking")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return p


def _pin_numerics_for_demo() -> None:
    """``exitrl demo`` from the shell re-runs itself under the tiny model build's pinned CPU numerics
    (``PINNED_NUMERICS``: set before torch loads), so its training and evaluation take the same code
    paths on any x86-64 machine with AVX2, as the build does."""
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
        return evaluate.run_compare(argv[2:])
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
