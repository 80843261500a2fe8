"""``exitrl export``: a run, checkpoint or model folder -> a folder plain ``vllm serve`` loads."""

from __future__ import annotations

import argparse

from rl.commands.output import refuse


def run(args: argparse.Namespace) -> int:
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
        return refuse("export", e)
    print(f"exported {args.source} -> {out} (vllm serve {out}, or exitrl serve {out})")
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
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
    x.set_defaults(fn=run)
    return x
