"""``exitrl bench rollout --profile``: where a rollout's wall time goes inside an in-process vLLM
engine, stage by stage, from wall clocks around the engine's own entry points (no tracing profiler:
its per-call overhead would inflate exactly the small Python stages being compared).

    add_request        LLMEngine.add_request: input processing, sampling-params copy, block hashes
    schedule           Scheduler.schedule: batch assembly, KV blocks, prefix-cache lookups
    model_forward      the model runner's forward (the network itself)
    model_prepare      the rest of the runner's execute_model (inputs, attention metadata)
    sample             the runner's sample_tokens (sampler, log-probs)
    update             Scheduler.update_from_output: per-request bookkeeping, stop checks
    outputs            OutputProcessor.process_outputs: request outputs, log-prob lists
    other              wall minus the stages above (the caller's loop: branch planning, read-back)

Counts per run: engine steps, rows (request-steps), tokens scheduled for prefill, tokens through
the forward (decode rows + prefill tokens), requests added.
``per_step`` fits the engine's cost per step as ``fixed_ms + per_row_us * rows`` from two decode
runs (1 row and ``rows`` rows, the same number of steps, EOS ignored), with the 1-row run's stages
per step. ``fit_step_cost`` fits the same model through two real runs (the serial group's full
rollouts alone and the parallel group) and ``explain_wall_ratio`` reads ``serial / parallel`` off it:
the share of each run's wall that is per-step fixed cost, and the ratio of rows alone.
``prefill_cost`` measures what a prompt token costs (fresh prompts, one token sampled each) and the
forward's arithmetic throughput against a plain float32 matmul's on the same machine: where the
forward runs near the matmul's rate, the engine is compute-bound and a run's wall follows the
tokens it puts through the forward, not how they are scheduled.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections import defaultdict

STAGES = ("add_request", "schedule", "model_forward", "model_prepare", "sample", "update", "outputs")


class EngineStageClock:
    """Wall-clock accumulators patched onto one in-process engine's objects (instance attributes,
    removed on exit)."""

    def __init__(self, llm):
        client = llm.llm_engine.engine_core
        core = getattr(client, "engine_core", None)
        if core is None or not hasattr(core, "scheduler"):
            raise RuntimeError(
                "bench rollout --profile: the engine core runs in another process; "
                "set VLLM_ENABLE_V1_MULTIPROCESSING=0 (the backend's CPU default)"
            )
        self.runner = core.model_executor.driver_worker.worker.model_runner
        self.targets = [
            (llm.llm_engine, "add_request", "add_request"),
            (core.scheduler, "schedule", "schedule"),
            (core.scheduler, "update_from_output", "update"),
            (self.runner, "_model_forward", "model_forward"),
            (self.runner, "execute_model", "execute_model"),
            (self.runner, "sample_tokens", "sample"),
            (llm.llm_engine.output_processor, "process_outputs", "outputs"),
        ]
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        # on a GPU the forward returns once its kernels are queued: wait for them, so the forward's
        # clock holds the forward and not the sampler that would otherwise wait for it
        self.device = getattr(self.runner, "device", None)
        self.sync = None
        if getattr(self.device, "type", None) == "cuda":
            import torch

            self.sync = torch.cuda.synchronize

    def _timed(self, fn, stage):
        sync = self.sync if stage == "model_forward" else None

        @functools.wraps(fn)
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                out = fn(*a, **k)
                if sync is not None:
                    sync()
            finally:
                self.seconds[stage] += time.perf_counter() - t0
            if stage == "schedule":
                rows = out.num_scheduled_tokens
                self.counts["steps"] += 1 if rows else 0
                self.counts["rows"] += len(rows)
                self.counts["prefill_tokens"] += sum(n for n in rows.values() if n > 1)
                self.counts["tokens"] += sum(rows.values())
            elif stage == "add_request":
                self.counts["requests"] += 1
            return out

        return wrapper

    @contextlib.contextmanager
    def measure(self):
        """Reset the clocks, time the block, and leave ``report`` for it."""
        self.seconds.clear()
        self.counts.clear()
        for obj, name, stage in self.targets:
            setattr(obj, name, self._timed(getattr(obj, name), stage))
        t0 = time.perf_counter()
        try:
            yield self
        finally:
            self.wall = time.perf_counter() - t0
            for obj, name, _ in self.targets:
                delattr(obj, name)

    def report(self) -> dict:
        s = dict(self.seconds)
        s["model_prepare"] = s.pop("execute_model", 0.0) - s.get("model_forward", 0.0)
        staged = {k: round(s.get(k, 0.0), 3) for k in STAGES}
        staged["other"] = round(self.wall - sum(s.get(k, 0.0) for k in STAGES), 3)
        return {"wall_s": round(self.wall, 3), "stages_s": staged, **{k: self.counts[k] for k in sorted(self.counts)}}


def per_step_cost(be, prompt: list[int], rows: int, steps: int = 128) -> dict:
    """The engine's decode cost per step as ``fixed_ms + per_row_us * rows``: two runs of ``steps``
    decode steps (EOS ignored, empty prefix cache), at 1 row and at ``rows`` rows; the 1-row run's
    stages per step (``fixed_stages_ms``) say where a step's fixed cost goes."""
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=steps, ignore_eos=True, temperature=1.0, detokenize=False, logprobs=0)
    clock = EngineStageClock(be.llm)
    walls, stages = [], {}
    for n in (1, rows):
        be.llm.reset_prefix_cache()
        with clock.measure():
            be.llm.generate([{"prompt_token_ids": prompt}] * n, sp, use_tqdm=False)
        walls.append(clock.wall)
        if n == 1:
            stages = {k: round(v * 1e3 / steps, 3) for k, v in clock.report()["stages_s"].items()}
    fixed = walls[0] / steps
    per_row = (walls[1] - walls[0]) / (steps * (rows - 1))
    return {
        "steps": steps,
        "rows": rows,
        "fixed_ms": round(fixed * 1e3, 2),
        "per_row_us": round(per_row * 1e6, 1),
        "fixed_stages_ms": stages,
    }


def forward_flops_per_token(hf_config) -> int:
    """Floating-point operations of one token through a dense decoder's linear layers: 2 x their
    weights, ``2 * L * (h*d*(q + 2*kv) + q*d*h + 3*h*I)`` (q / k / v and output projections, gated
    MLP); attention scores, norms and the LM head (sampled rows only) are left out."""
    h, n_layers, inter = hf_config.hidden_size, hf_config.num_hidden_layers, hf_config.intermediate_size
    q = hf_config.num_attention_heads
    kv = getattr(hf_config, "num_key_value_heads", None) or q
    d = getattr(hf_config, "head_dim", None) or h // q
    return 2 * n_layers * (h * d * (q + 2 * kv) + q * d * h + 3 * h * inter)


def matmul_gflops(device=None, n: int = 1024, repeats: int = 8) -> float:
    """The float32 matmul rate (GFLOP/s) of ``device`` (default CPU, on the threads torch uses
    here), best of ``repeats`` ``n x n`` products: the scale the forward's rate is read against."""
    import torch

    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    cuda = a.device.type == "cuda"
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def prefill_cost(be, prompt_len: int = 32, prompts: int = 256, seed: int = 0) -> dict:
    """What a prompt token costs the engine: ``prompts`` fresh prompts of ``prompt_len`` random
    tokens (empty prefix cache), one token sampled each. Wall and forward microseconds per prefill
    token; the forward's rate in GFLOP/s (``forward_flops_per_token``) and that rate as a share of
    ``matmul_gflops`` on the engine's device (near 1: compute-bound)."""
    import random

    from vllm import SamplingParams

    hf_config = be.llm.llm_engine.vllm_config.model_config.hf_config
    rng = random.Random(seed)
    batch = [[rng.randrange(hf_config.vocab_size) for _ in range(prompt_len)] for _ in range(prompts)]
    sp = SamplingParams(max_tokens=1, temperature=1.0, detokenize=False, logprobs=0)
    clock = EngineStageClock(be.llm)
    be.llm.reset_prefix_cache()
    with clock.measure():
        be.llm.generate([{"prompt_token_ids": p} for p in batch], sp, use_tqdm=False)
    rep = clock.report()
    tokens, forward = rep["prefill_tokens"], clock.seconds["model_forward"]
    gflops = forward_flops_per_token(hf_config) * tokens / forward / 1e9
    peak = matmul_gflops(clock.device)
    return {
        "prompts": prompts,
        "prompt_len": prompt_len,
        "prefill_tokens": tokens,
        "steps": rep["steps"],
        "wall_us_per_token": round(rep["wall_s"] * 1e6 / tokens, 2),
        "forward_us_per_token": round(forward * 1e6 / tokens, 2),
        "forward_gflops": round(gflops, 1),
        "matmul_gflops": round(peak, 1),
        "forward_vs_matmul": round(gflops / peak, 3),
    }


def fit_step_cost(decode_heavy: dict, other: dict) -> dict:
    """Fit ``wall = fixed_s * steps + per_row_s * rows`` exactly through two profiled runs (their
    ``wall_s``, ``steps``, ``rows``), e.g. the serial group's full rollouts alone and the parallel
    group: the engine's effective cost of a step whatever its batch, and of each row in it, under
    the runs' own KV lengths (``per_step_cost`` measures them on a short synthetic decode)."""
    s1, r1, w1 = decode_heavy["steps"], decode_heavy["rows"], decode_heavy["wall_s"]
    s2, r2, w2 = other["steps"], other["rows"], other["wall_s"]
    det = s1 * r2 - s2 * r1
    if det == 0:
        raise ValueError("fit_step_cost: the two runs have proportional steps and rows; nothing to separate")
    fixed = (w1 * r2 - w2 * r1) / det
    per_row = (s1 * w2 - s2 * w1) / det
    return {"fixed_ms": round(fixed * 1e3, 3), "per_row_us": round(per_row * 1e6, 2)}


def explain_wall_ratio(serial: dict, parallel: dict, fit: dict) -> dict:
    """What the fitted step cost says about ``serial / parallel``: each run's fixed share (steps x
    fixed cost over its wall), the ratio a step cost only its rows would give, and (where the runs
    counted them) the ratio of tokens through the forward: what a compute-bound engine's walls
    follow."""
    fixed, per_row = fit["fixed_ms"] / 1e3, fit["per_row_us"] / 1e6

    def share(run):
        return round(fixed * run["steps"] / run["wall_s"], 3)

    def fitted(run):
        return fixed * run["steps"] + per_row * run["rows"]

    return {
        "serial_fixed_share": share(serial),
        "parallel_fixed_share": share(parallel),
        "rows_ratio": round(serial["rows"] / parallel["rows"], 3),
        "steps_ratio": round(serial["steps"] / parallel["steps"], 3),
        **(
            {"tokens_ratio": round(serial["tokens"] / parallel["tokens"], 3)}
            if "tokens" in serial and "tokens" in parallel
            else {}
        ),
        "wall_ratio_fitted": round(fitted(serial) / fitted(parallel), 3),
    }
