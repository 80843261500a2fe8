"""``exitrl bench ...``: benchmarks, side by side against the usual baseline (``rl.bench``); one
parser and one handler per benchmark."""

from __future__ import annotations

import argparse
import os

from rl.commands.output import print_report, refuse


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _bench_report(name: str, run, as_json: bool, errors: tuple[type[Exception], ...]) -> int:
    """Run one bench; a refused input (``errors``) is one line naming it, exit 2."""
    try:
        report = run()
    except errors as e:
        return refuse(f"bench {name}", e)
    return print_report(report, as_json)


# ---------------------------------------------------------------------------------- logprob


def run_logprob(args: argparse.Namespace) -> int:
    from rl.bench.logprob import main

    report = main(n=args.n, v=args.vocab, d=args.d, dtype=args.dtype, repeats=args.repeats, entropy=not args.no_entropy)
    return print_report(report, args.json)


def add_logprob(bsub) -> None:
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
    _json_flag(lp)
    lp.set_defaults(fn=run_logprob)


# ---------------------------------------------------------------------------------- rewards


def run_rewards(args: argparse.Namespace) -> int:
    from rl.bench.rewards import main

    report = main(n=args.n, workers=args.workers)
    return print_report(report, args.json)


def add_rewards(bsub) -> None:
    rw = bsub.add_parser("rewards", help="verified items per second and worst-case latency of the batch verifier")
    rw.add_argument("--n", type=int, default=10000, help="responses to verify")
    rw.add_argument("--workers", type=int, default=2)
    _json_flag(rw)
    rw.set_defaults(fn=run_rewards)


# ---------------------------------------------------------------------------------- rollout


def run_rollout(args: argparse.Namespace) -> int:
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


def add_rollout(bsub) -> None:
    ro = bsub.add_parser("rollout", help="serial groups (1 full + m exits) vs parallel groups of m+1 full rollouts")
    ro.add_argument(
        "--prompts",
        type=int,
        default=128,
        help="prompts (use at least 64: fewer make batches too small to compare the two group shapes; 128 keeps "
        "per-step overhead from dominating on CPU)",
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
    _json_flag(ro)
    ro.set_defaults(fn=run_rollout)


# ---------------------------------------------------------------------------------- trainer


def run_trainer(args: argparse.Namespace) -> int:
    from rl.bench.trainer import main

    report = main(
        prompts=args.prompts,
        group=args.group,
        max_tokens=args.max_tokens,
        steps=args.steps,
        profile=args.profile,
        backend=args.backend,
    )
    return print_report(report, args.json)


def add_trainer(bsub) -> None:
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
    _json_flag(tr)
    tr.set_defaults(fn=run_trainer)


# ---------------------------------------------------------------------------------- routed


def run_routed(args: argparse.Namespace) -> int:
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


def add_routed(bsub) -> None:
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
    _json_flag(rb)
    rb.set_defaults(fn=run_routed)


# ---------------------------------------------------------------------------------- exit-head


def run_exit_head(args: argparse.Namespace) -> int:
    from rl.bench.exit_head import main

    shapes = tuple(x.strip() for x in args.shapes.split(",") if x.strip())
    return print_report(main(shapes=shapes, device=args.device, repeats=args.repeats), args.json)


def add_exit_head(bsub) -> None:
    eh = bsub.add_parser(
        "exit-head", help="fused layer read-outs vs per-layer full logits; batched routers vs a loop of routers"
    )
    eh.add_argument(
        "--shapes", default="tiny,large", help="comma-separated: tiny (d 128, V 384), large (d 1024, V 32k)"
    )
    eh.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    eh.add_argument("--repeats", type=int, default=3, help="timed rounds (after one warm-up round); medians reported")
    _json_flag(eh)
    eh.set_defaults(fn=run_exit_head)


# ---------------------------------------------------------------------------------- serve


def run_serve(args: argparse.Namespace) -> int:
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
        policy=args.policy,
        with_sft=not args.no_sft,
        curve=tuple(int(c) for c in args.curve.split(",")),
        ffs_mode=args.ffs_mode,
        ffs_stream_interval=args.ffs_stream_interval,
        plot=args.plot,
        rounds=args.rounds,
    )
    return print_report(report, args.json)


def add_serve(bsub) -> None:
    se = bsub.add_parser(
        "serve",
        help="exitrl serve on the demo's trained S-GRPO policy and its SFT model: plain vs FFS@k vs majority@k, "
        "the latency curve over concurrency, then a mixed load (vLLM's load tool + FFS)",
    )
    se.add_argument("--url", default=None, help="a running exitrl serve (default: serve the trained policy, then SFT)")
    se.add_argument(
        "--policy",
        default=None,
        help="the trained policy (a run or model folder; default: the demo's S-GRPO run, trained once if missing)",
    )
    se.add_argument("--no-sft", action="store_true", help="leave out the SFT model's row")
    se.add_argument("--curve", default="1,4,16", help="concurrencies of the latency curve")
    se.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the strategies, pooled")
    se.add_argument(
        "--ffs-mode",
        choices=("engine", "relay"),
        default="engine",
        help="the server's FFS race: 'engine' ends the losers inside vLLM, 'relay' streams and aborts them",
    )
    se.add_argument(
        "--ffs-stream-interval",
        type=int,
        default=0,
        help="the server's FFS relay: 0 streams each sample's first token and finish only; N every N tokens",
    )
    se.add_argument("--plot", default="runs/bench/serve_latency.png", help="latency against concurrency (png)")
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
    se.set_defaults(fn=run_serve)


BENCHES = (add_logprob, add_rewards, add_rollout, add_trainer, add_routed, add_exit_head, add_serve)


def add_parser(sub) -> argparse.ArgumentParser:
    b = sub.add_parser("bench", help="benchmarks, side by side against the usual baseline")
    bsub = b.add_subparsers(dest="bench", required=True)
    for add in BENCHES:
        add(bsub)
    return b
