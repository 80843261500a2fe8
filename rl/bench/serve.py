"""``exitrl bench serve``: load and strategy comparison against ``exitrl serve``.

Starts ``exitrl serve`` on an export of the tiny reasoner (or targets ``--url``), then on the same
held-out synthetic prompts and concurrency drives it with the async ``openai`` client:

    plain     one sample per prompt
    ffs@k     ``ffs_n = k``: the first of k samples to finish wins, the rest are aborted
    maj@k     n = k samples in one request, majority vote over their boxed answers

per strategy: p50 / p99 latency, output tokens/s, mean sequential and total completion tokens,
accuracy. ``ffs_p50_latency_ratio`` = ffs@k p50 / maj@k p50 (same run). Plain sampling's
throughput and latency under concurrency also come from vLLM's own load tool (``vllm bench serve``'s
code, random dataset) pointed at the front end, reported under ``load_tool``.
"""

from __future__ import annotations

import asyncio
import json
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
    from rewards.verify import extract_answer, verify_answer
    from rollout.ffs import majority_vote

    sem = asyncio.Semaphore(cfg["concurrency"])
    rows: list[dict] = []

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
            dt = time.perf_counter() - t0
        texts = [c.text for c in r.choices]
        if strategy == "majority":
            answers = [extract_answer(t) for t in texts]
            win = majority_vote(answers)
            ok = win is not None and verify_answer(f"\\boxed{{{win}}}", gold)
            lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
            seq, total = max(lengths), r.usage.completion_tokens
        elif strategy == "ffs":
            ok = verify_answer(texts[0], gold)
            seq, total = r.usage.sequential_tokens, r.usage.ffs_total_completion_tokens
        else:
            ok = verify_answer(texts[0], gold)
            seq = total = r.usage.completion_tokens
        rows.append({"latency": dt, "ok": ok, "sequential": seq, "total": total})

    t0 = time.perf_counter()
    await asyncio.gather(*(one(p, g) for p, g in zip(prompts, golds)))
    wall = time.perf_counter() - t0
    lat = [r["latency"] for r in rows]
    return {
        "p50_latency_s": _percentile(lat, 0.5),
        "p99_latency_s": _percentile(lat, 0.99),
        "output_tokens_per_s": sum(r["total"] for r in rows) / wall,
        "sequential_tokens_mean": statistics.mean(r["sequential"] for r in rows),
        "total_tokens_mean": statistics.mean(r["total"] for r in rows),
        "accuracy": sum(r["ok"] for r in rows) / len(rows),
        "wall_s": wall,
    }


def load_tool(
    url: str, model: str, tokenizer_dir: str, n: int, concurrency: int, out_len: int, api_key: str | None = None
) -> dict:
    """vLLM's ``bench serve`` (openai-completions backend, random prompts, streamed) against ``url``."""
    import os

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

    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    text = httpx.get(url + "/metrics", headers=headers, timeout=30).text
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
) -> dict:
    from openai import AsyncOpenAI
    from transformers import AutoTokenizer

    from rl.data.prompts import build_prompt
    from rl.data.synthetic_task import heldout_problems

    served, tmp, tok_dir = None, None, tokenizer
    if url is None:
        from rl.models.tiny_reasoner import build_tiny_model
        from rl.serving.export import export
        from rl.serving.server import ServeConfig, Served

        tmp = tempfile.TemporaryDirectory()
        out = export(build_tiny_model(), Path(tmp.name) / "tiny", dtype="float32")
        served = Served(ServeConfig(model_dir=str(out), port=0, max_model_len=1024, served_model_name="tiny"))
        url, model, tok_dir = served.url, "tiny", str(out)
    try:
        client = AsyncOpenAI(base_url=url + "/v1", api_key=api_key or "none", max_retries=0, timeout=600)
        if model is None:
            model = (asyncio.run(client.models.list())).data[0].id
        tok_dir = tok_dir or model  # a --url server: --tokenizer, else its model name as a folder or hub id
        tok = AutoTokenizer.from_pretrained(tok_dir)
        problems = heldout_problems(n_prompts)
        prompts = [build_prompt(tok, p.problem) for p in problems]
        golds = [p.answer for p in problems]
        cfg = {"concurrency": concurrency, "max_tokens": max_tokens, "temperature": temperature}

        async def run_all():
            out = {}
            for name, strategy in (("plain", "plain"), (f"ffs@{k}", "ffs"), (f"maj@{k}", "majority")):
                out[name] = await _drive(client, model, prompts, golds, strategy, k, cfg, tok)
            return out

        strategies = asyncio.run(run_all())
        report = {
            "url": url,
            "n_prompts": n_prompts,
            "concurrency": concurrency,
            "k": k,
            "temperature": temperature,
            "strategies": strategies,
            "ffs_p50_latency_ratio": strategies[f"ffs@{k}"]["p50_latency_s"] / strategies[f"maj@{k}"]["p50_latency_s"],
            "ffs_total_tokens_ratio": strategies[f"ffs@{k}"]["total_tokens_mean"]
            / strategies[f"maj@{k}"]["total_tokens_mean"],
            "ffs_accuracy": strategies[f"ffs@{k}"]["accuracy"],
        }
        if with_load_tool:
            report["load"] = mixed_load(url, model, tok_dir, api_key, load_requests, load_concurrency, k)
        return report
    finally:
        if served is not None:
            served.stop()
        if tmp is not None:
            tmp.cleanup()
