"""``exitrl serve``: vLLM on a private socket behind the exitrl front end (``rl.serving``)."""

from __future__ import annotations

import argparse

from rl.commands.output import refuse


def run(args: argparse.Namespace) -> int:
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
        ffs_mode=args.ffs_mode,
        ffs_stream_interval=args.ffs_stream_interval,
    )
    try:
        return serve(cfg)
    except (ExportError, ValueError) as e:
        return refuse("serve", e)


def add_parser(sub) -> argparse.ArgumentParser:
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
        "--ffs-mode",
        choices=("engine", "relay"),
        default="engine",
        help="FFS race: 'engine' (default) ends the losers inside vLLM the step after the first finish; "
        "'relay' streams the samples and aborts the losers from the front end",
    )
    sv.add_argument(
        "--ffs-stream-interval",
        type=int,
        default=0,
        help="FFS relay: 0 (default) streams each sample's first token and its finish only; N > 0 every N tokens",
    )
    sv.add_argument(
        "--vllm-args",
        nargs=argparse.REMAINDER,
        help="engine options passed on to vllm serve (not --host/--port/--uds/--api-key/--middleware ...: "
        "the upstream stays on a private socket)",
    )
    sv.set_defaults(fn=run)
    return sv
