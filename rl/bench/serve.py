"""``exitrl bench serve``: the strategies against ``exitrl serve``, on the model users serve.

Serves the demo's trained S-GRPO policy (``rl.bench.serve_models``) and, as a second row, the SFT
model it was trained from (or targets ``--url``), and drives each with the async ``openai`` client on
the same held-out synthetic prompts at the same concurrency:

    plain     one sample per prompt
    ffs@k     ``ffs_n = k``: the first of k samples to finish wins, the rest are aborted
    maj@k     n = k samples in one request, majority vote over their boxed answers

per strategy: p50 / p99 latency, time to the first finished sample (``ttff``; plain: its latency;
FFS: the front end's ``ffs_first_finish_s``; majority: not observable without streaming), mean
sequential and total completion tokens, the tokens vLLM generated (its ``generation_tokens``
counter over the strategy's run) and, for FFS, the losers' share of them (generated minus the
winners'), accuracy with its bootstrap CI, requests and tokens per second. The same three at
concurrency 1, 4 and 16 give the latency curve (``--plot``). ``ffs_p50_latency_ratio`` = ffs@k p50 /
maj@k p50 and ``ffs_vs_plain_p50_latency_ratio`` = ffs@k p50 / plain p50, on the trained policy.
Plain sampling's throughput under load also comes from vLLM's own load tool (``vllm bench serve``'s
code) pointed at the front end, with FFS requests beside it, under ``load``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))
    return xs[k]


async def _drive(client, model: str, prompts: list[str], golds: list[str], strategy: str, k: int, cfg: dict, tok):
    """One strategy over ``prompts`` at ``cfg["concurrency"]``: per request its latency and reply;
    answers are scored after the last reply, so no verification runs on the event loop while
    other requests' replies wait on it (that would count as their latency)."""
    sem = asyncio.Semaphore(cfg["concurrency"])
    replies: list[tuple[float, object, str]] = []

    async def one(prompt: str, gold: str):
        async with sem:
            extra = {"ffs_n": k} if strategy == "ffs" else {}
            t0 = time.perf_counter()
            r = await client.completions.create(
                model=model,
                prompt=prompt,
                max_tokens=cfg["max_tokens"],
                temperature=cfg["temperature"],
                n=k if strategy == "majority" else 1,
                extra_body=extra,
            )
            replies.append((time.perf_counter() - t0, r, gold))

    before = cfg["generated"]()
    t0 = time.perf_counter()
    await asyncio.gather(*(one(p, g) for p, g in zip(prompts, golds)))
    wall = time.perf_counter() - t0
    generated = cfg["generated"]() - before if before is not None else None
    return [_scored(dt, r, gold, strategy, tok) for dt, r, gold in replies], wall, generated


def _scored(dt: float, r, gold: str, strategy: str, tok) -> dict:
    """One reply's row: latency, correct, sequential and total tokens, time to the first finish."""
    from rewards.verify import extract_answer, verify_answer
    from rollout.ffs import majority_vote

    texts, ttff = [c.text for c in r.choices], dt
    if strategy == "majority":
        win = majority_vote([extract_answer(t) for t in texts])
        ok = win is not None and verify_answer(f"\\boxed{{{win}}}", gold)
        lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
        seq, total, ttff = max(lengths), r.usage.completion_tokens, None
    elif strategy == "ffs":
        ok = verify_answer(texts[0], gold)
        seq, total = r.usage.sequential_tokens, r.usage.ffs_total_completion_tokens
        ttff = r.usage.ffs_first_finish_s
    else:
        ok = verify_answer(texts[0], gold)
        seq = total = r.usage.completion_tokens
    return {"latency": dt, "ok": ok, "sequential": seq, "total": total, "ttff": ttff}


def summarise(rows: list[dict], wall: float, strategy: str, generated: float | None) -> dict:
    """One strategy's figures from its requests (``rows``), the run's wall seconds and the tokens
    vLLM generated during it (None when its counter cannot be read)."""
    from rl.evaluation.scoring import bootstrap_ci

    lat = [r["latency"] for r in rows]
    ttff = [r["ttff"] for r in rows if r["ttff"] is not None]
    ok = [float(r["ok"]) for r in rows]
    winners = sum(r["sequential"] for r in rows) if strategy == "ffs" else None
    losers = (generated - winners) / len(rows) if generated is not None and winners is not None else None
    return {
        "p50_latency_s": _percentile(lat, 0.5),
        "p99_latency_s": _percentile(lat, 0.99),
        "ttff_p50_s": _percentile(ttff, 0.5) if ttff else None,
        "output_tokens_per_s": sum(r["total"] for r in rows) / wall,
        "requests_per_s": len(rows) / wall,
        "sequential_tokens_mean": statistics.mean(r["sequential"] for r in rows),
        "total_tokens_mean": statistics.mean(r["total"] for r in rows),
        "upstream_generated_tokens": generated,
        "losers_tokens_mean": losers,
        "accuracy": sum(ok) / len(rows),
        "accuracy_ci95": list(bootstrap_ci(ok)),
        "wall_s": wall,
    }


def metrics_text(url: str, api_key: str | None) -> str:
    """The front end's ``/metrics`` (its own and vLLM's), with the key when one is set."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.get(url + "/metrics", headers=headers, timeout=30).text


def generated_tokens(url: str, api_key: str | None) -> float | None:
    """vLLM's ``generation_tokens`` counter (every token its engine sampled, aborted requests'
    included), read through the front end's ``/metrics``; None when it is not there."""
    import re

    text = metrics_text(url, api_key)
    found = re.findall(r"^vllm:generation_tokens_total(?:\{[^}]*\})? (\S+)", text, re.M)
    return sum(float(x) for x in found) if found else None


def load_tool(
    url: str, model: str, tokenizer_dir: str, n: int, concurrency: int, out_len: int, api_key: str | None = None
) -> dict:
    """vLLM's ``bench serve`` (openai-completions backend, random prompts, streamed) against ``url``."""

    code = (
        "import json, sys\n"
        "from vllm.benchmarks.serve import add_cli_args, main\n"
        "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
        "p = FlexibleArgumentParser(); add_cli_args(p); a = p.parse_args(sys.argv[1:])\n"
        "r = main(a)\n"
        "keep = {k: v for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}\n"
        "keep['errors'] = sorted({str(e)[:200] for e in r.get('errors') or [] if e})\n"
        "print('EXITRL_RESULT ' + json.dumps(keep))\n"
    )
    args = [
        "--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions", "--model", model,
        "--tokenizer", tokenizer_dir, "--dataset-name", "random", "--random-input-len", "32",
        "--random-output-len", str(out_len), "--num-prompts", str(n), "--max-concurrency", str(concurrency),
        "--ignore-eos", "--disable-tqdm", "--seed", "0",
    ]  # fmt: skip
    env = {**os.environ, "OPENAI_API_KEY": api_key} if api_key else None
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=900, env=env)
    for line in r.stdout.splitlines():
        if line.startswith("EXITRL_RESULT "):
            res = json.loads(line[len("EXITRL_RESULT ") :])
            pick = (
                "completed", "failed", "errors", "request_throughput", "output_throughput", "median_ttft_ms",
                "p99_ttft_ms", "median_tpot_ms", "median_e2el_ms", "p99_e2el_ms",
            )  # fmt: skip
            return {k: res[k] for k in pick if k in res} | {"num_prompts": n, "max_concurrency": concurrency}
    return {"error": (r.stderr or r.stdout)[-800:]}


def front_rss_bytes(url: str, api_key: str | None) -> float | None:
    """The front end's resident memory, from its ``/metrics`` (``process_resident_memory_bytes``)."""
    import re

    text = metrics_text(url, api_key)
    m = re.search(r"^process_resident_memory_bytes (\S+)", text, re.M)
    return float(m.group(1)) if m else None


async def _ffs_load(
    url: str, model: str, api_key: str | None, prompts: list[str], k: int, concurrency: int, max_tokens: int
):
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key=api_key or "none", max_retries=0, timeout=600)
    sem = asyncio.Semaphore(concurrency)
    lat, errors = [], []

    async def one(p: str):
        async with sem:
            t0 = time.perf_counter()
            try:
                await client.completions.create(
                    model=model, prompt=p, max_tokens=max_tokens, temperature=1.0, extra_body={"ffs_n": k}
                )
                lat.append(time.perf_counter() - t0)
            except Exception as e:  # an error is a finding: counted and reported, never raised
                errors.append(f"{type(e).__name__}: {str(e)[:200]}")

    await asyncio.gather(*(one(p) for p in prompts))
    await client.close()
    return {
        "completed": len(lat),
        "failed": len(errors),
        "errors": sorted(set(errors)),
        "p50_latency_s": _percentile(lat, 0.5) if lat else None,
        "p99_latency_s": _percentile(lat, 0.99) if lat else None,
    }


def mixed_load(
    url: str,
    model: str,
    tokenizer_dir: str,
    api_key: str | None = None,
    n_requests: int = 64,
    concurrency: int = 32,
    k: int = 4,
    max_tokens: int = 32,
) -> dict:
    """Plain and FFS at once: vLLM's load tool (``vllm bench serve``: ``n_requests`` streamed plain
    completions at ``concurrency``) while the openai client sends ``n_requests`` FFS@k requests at the
    same concurrency; per kind completed / failed / errors and latency percentiles, and the front
    end's RSS before and after."""
    from concurrent.futures import ThreadPoolExecutor

    from rl.data.synthetic_task import heldout_problems

    prompts = [p.problem for p in heldout_problems(n_requests)]
    rss0 = front_rss_bytes(url, api_key)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(1) as pool:
        plain = pool.submit(load_tool, url, model, tokenizer_dir, n_requests, concurrency, max_tokens, api_key)
        ffs = asyncio.run(_ffs_load(url, model, api_key, prompts, k, concurrency, max_tokens))
        plain = plain.result()
    rss1 = front_rss_bytes(url, api_key)
    errors = (plain.get("failed", n_requests) if "error" not in plain else n_requests) + ffs["failed"]
    return {
        "n_requests": n_requests,
        "concurrency": concurrency,
        "plain": plain,
        f"ffs@{k}": ffs,
        "errors": errors,
        "wall_s": time.perf_counter() - t0,
        "front_rss_mb_before": rss0 / 2**20 if rss0 else None,
        "front_rss_mb_after": rss1 / 2**20 if rss1 else None,
    }


def _strategies(url: str, model: str, api_key: str | None, problems, tok, k: int, cfg: dict) -> dict:
    """plain, ffs@k and maj@k on the same prompts (one event loop, one client): one untimed warm-up
    request each, then ``cfg["rounds"]`` interleaved rounds whose requests are pooled per strategy."""
    from openai import AsyncOpenAI

    from rl.data.prompts import build_prompt

    prompts = [build_prompt(tok, p.problem) for p in problems]
    golds = [p.answer for p in problems]
    cfg = {**cfg, "generated": lambda: generated_tokens(url, api_key)}

    names = {"plain": "plain", f"ffs@{k}": "ffs", f"maj@{k}": "majority"}

    async def run_all():
        client = AsyncOpenAI(base_url=url + "/v1", api_key=api_key or "none", max_retries=0, timeout=600)
        warm = prompts[: cfg["concurrency"]]
        for strategy in names.values():  # first requests pay one-time costs: not timed
            await _drive(client, model, warm, golds[: len(warm)], strategy, k, {**cfg, "generated": lambda: None}, tok)
        pooled = {name: ([], 0.0, 0.0) for name in names}
        order = list(names)
        for r in range(cfg["rounds"]):  # interleaved rounds, each starting with another strategy
            for name in order[r % len(order) :] + order[: r % len(order)]:
                rows, wall, gen = await _drive(client, model, prompts, golds, names[name], k, cfg, tok)
                prev = pooled[name]
                pooled[name] = (
                    prev[0] + rows,
                    prev[1] + wall,
                    None if gen is None or prev[2] is None else prev[2] + gen,
                )
        await client.close()
        return {name: summarise(*pooled[name][:2], names[name], pooled[name][2]) for name in names}

    return asyncio.run(run_all())


def ratios(strategies: dict, k: int) -> dict:
    """FFS@k's p50 latency over majority@k's and over plain sampling's, and its total tokens over
    majority's."""
    ffs, maj, plain = strategies[f"ffs@{k}"], strategies[f"maj@{k}"], strategies["plain"]
    return {
        "ffs_p50_latency_ratio": ffs["p50_latency_s"] / maj["p50_latency_s"],
        "ffs_vs_plain_p50_latency_ratio": ffs["p50_latency_s"] / plain["p50_latency_s"],
        "ffs_total_tokens_ratio": ffs["total_tokens_mean"] / maj["total_tokens_mean"],
    }


def bench_model(url: str, model: str, tok_dir: str, api_key: str | None, k: int, cfg: dict, curve: list[int]) -> dict:
    """One served model: the strategies at ``cfg["concurrency"]`` on ``cfg["n_prompts"]`` held-out
    problems (``cfg["rounds"]`` rounds pooled), the ratios, and the p50 latency of each strategy at
    every concurrency of ``curve`` (one round at the others)."""
    from transformers import AutoTokenizer

    from rl.data.synthetic_task import heldout_problems

    tok = AutoTokenizer.from_pretrained(tok_dir)
    problems = heldout_problems(cfg["n_prompts"])
    strategies = _strategies(url, model, api_key, problems, tok, k, cfg)
    out = {"strategies": strategies, **ratios(strategies, k), "curve": []}
    for c in curve:
        at = (
            strategies
            if c == cfg["concurrency"]
            else _strategies(url, model, api_key, problems, tok, k, {**cfg, "concurrency": c})
        )
        out["curve"].append({"concurrency": c, **{name: at[name]["p50_latency_s"] for name in at}})
    return out


def plot_curve(models: dict, k: int, path: Path) -> None:
    """p50 latency against concurrency, one panel per model, one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.6), squeeze=False)
    for ax, (name, m) in zip(axes[0], models.items()):
        xs = [pt["concurrency"] for pt in m["curve"]]
        for strategy in ("plain", f"ffs@{k}", f"maj@{k}"):
            ax.plot(xs, [pt[strategy] for pt in m["curve"]], marker="o", label=strategy)
        ax.set(xscale="log", xticks=xs, xticklabels=[str(x) for x in xs], xlabel="concurrency", title=name)
        ax.set_ylabel("p50 latency (s)")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


class ServeProcess:
    """``exitrl serve`` of an export in a process of its own, as users run it (the bench's client then
    shares no interpreter lock with the front end): ``url``; ``stop()`` by its own pid."""

    def __init__(self, export_dir: Path, name: str, ffs_mode: str, ffs_stream_interval: int, timeout_s: float = 900):
        from rl.serving.server import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable, "-m", "rl.cli", "serve", str(export_dir), "--port", str(self.port),
            "--served-model-name", name, "--max-model-len", "1024", "--ffs-mode", ffs_mode,
            "--ffs-stream-interval", str(ffs_stream_interval),
        ]  # fmt: skip
        self.log = tempfile.TemporaryFile()
        env = {k: v for k, v in os.environ.items() if k != "EXITRL_API_KEY"}  # loopback, no key
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        t0 = time.time()
        while not self._healthy():
            if self.proc.poll() is not None or time.time() - t0 > timeout_s:
                self.stop()
                self.log.seek(0)
                tail = self.log.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"exitrl serve {export_dir} did not come up: {tail}")
            time.sleep(1)

    def _healthy(self) -> bool:
        import httpx

        try:
            return httpx.get(self.url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # serve stops its vLLM by its own pid
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGINT)  # a second signal: vLLM killed at once
                self.proc.wait(30)
        self.log.close()


def _serve(model_dir: Path, name: str, ffs_mode: str, ffs_stream_interval: int):
    """``exitrl serve`` on an export of ``model_dir`` (a model or run folder): (server, export, tmp)."""
    from rl.serving.export import export

    tmp = tempfile.TemporaryDirectory()
    out = export(model_dir, Path(tmp.name) / name, dtype="float32")
    try:
        return ServeProcess(out, name, ffs_mode, ffs_stream_interval), out, tmp
    except BaseException:
        tmp.cleanup()
        raise


def main(
    url: str | None = None,
    model: str | None = None,
    n_prompts: int = 48,
    concurrency: int = 4,
    k: int = 4,
    max_tokens: int = 400,
    temperature: float = 1.0,
    with_load_tool: bool = True,
    load_requests: int = 64,
    load_concurrency: int = 32,
    api_key: str | None = None,
    tokenizer: str | None = None,
    policy: str | None = None,
    with_sft: bool = True,
    curve: tuple[int, ...] = (1, 4, 16),
    ffs_mode: str = "engine",
    ffs_stream_interval: int = 0,
    plot: str | None = None,
    rounds: int = 3,
) -> dict:
    """The bench (see the module): on ``url``, or on the trained policy (``policy``: a run or model
    folder; default the demo's S-GRPO run) and the SFT model, each served in turn."""
    cfg = {"concurrency": concurrency, "max_tokens": max_tokens, "temperature": temperature, "n_prompts": n_prompts}
    cfg["rounds"] = rounds
    if url is not None:
        from openai import OpenAI

        model = model or OpenAI(base_url=url + "/v1", api_key=api_key or "none").models.list().data[0].id
        rows = {model: bench_model(url, model, tokenizer or model, api_key, k, cfg, list(curve))}
        report = {"url": url, "models": rows, "served": model, **_headline(rows[model])}
        if with_load_tool:
            report["load"] = mixed_load(url, model, tokenizer or model, api_key, load_requests, load_concurrency, k)
        return _finish({**report, "rounds": rounds}, k, plot, n_prompts, concurrency, temperature, ffs_stream_interval)
    from rl.bench.serve_models import trained_policy
    from rl.models.tiny_reasoner import build_tiny_model

    sft = build_tiny_model()
    sources = {"sgrpo": Path(policy) if policy else trained_policy(sft)}
    if with_sft:
        sources["sft"] = sft
    rows: dict[str, dict] = {}
    report: dict = {"policy": str(sources["sgrpo"])}
    for name, src in sources.items():
        served, out, tmp = _serve(src, name, ffs_mode, ffs_stream_interval)
        try:
            rows[name] = bench_model(served.url, name, str(out), None, k, cfg, list(curve))
            if with_load_tool and name == "sgrpo":
                report["load"] = mixed_load(served.url, name, str(out), None, load_requests, load_concurrency, k)
        finally:
            served.stop()
            tmp.cleanup()
    report.update(models=rows, served="sgrpo", rounds=rounds, **_headline(rows["sgrpo"]))
    report["ffs_mode"] = ffs_mode
    return _finish(report, k, plot, n_prompts, concurrency, temperature, ffs_stream_interval)


def _headline(row: dict) -> dict:
    """The served model's strategies and ratios at the top level of the report."""
    keys = ("ffs_p50_latency_ratio", "ffs_vs_plain_p50_latency_ratio", "ffs_total_tokens_ratio")
    return {"strategies": row["strategies"], **{key: row[key] for key in keys}}


def _finish(
    report: dict, k: int, plot: str | None, n_prompts: int, concurrency: int, temperature: float, interval: int
):
    report.update(n_prompts=n_prompts, concurrency=concurrency, k=k, temperature=temperature)
    report["ffs_stream_interval"] = interval
    report["ffs_accuracy"] = report["strategies"][f"ffs@{k}"]["accuracy"]
    if plot:
        plot_curve(report["models"], k, Path(plot))
        report["plot"] = plot
    return report
