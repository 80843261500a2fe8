"""``exitrl bench rollout``: serial groups (1 full + m exits, prefix reused) against parallel groups
of m+1 full rollouts, same prompts, same backend, one run. Prints tokens, wall times and
``wall_ratio = serial / parallel``; ``full_only_ratio``: the serial group's full rollouts alone (its
floor: the branches' share is ``wall_ratio - full_only_ratio``), and the branches' prompt tokens the
prefix cache did not hold (partial KV blocks + the exit prompt, recomputed per branch).
``compiled``: vLLM with torch.compile (``enforce_eager=False``) instead of eager. ``repeats``: the timed
runs are interleaved that many times, each repeat starting with the next arm (no arm always
pays for running first), and each wall time is the median (on this 2-core machine repeats of one run
differ by up to a tenth of the ratio); ``wall_ratio_runs`` lists every repeat's ratio.
``profile``: on vLLM the engine's stages clocked per arm, and a fourth timed arm, the serial group
with its cuts moved onto KV-block boundaries (``block_aligned_ratio``: what it would cost if the
prefix cache held every branch's whole prefix); on HF the branch phase as one padded batch against
the backend's buckets of similar cuts."""

from __future__ import annotations

import dataclasses
import os
import statistics
import time

from rollout.backends.base import RolloutBackend
from rollout.backends.factory import make_backend


def main(
    n_prompts: int = 128,
    exits: int = 4,
    backend: str = "vllm",
    max_tokens: int = 320,
    answer_max_tokens: int = 16,
    min_ops: int = 6,
    max_ops: int = 6,
    seed: int = 0,
    block_size: int | None = None,
    compiled: bool = False,
    repeats: int = 5,
    profile: bool = False,
) -> dict:
    # bad options fail before any model or engine is built
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if backend not in ("vllm", "hf"):
        raise ValueError(f"backend must be 'vllm' or 'hf', got {backend!r}")
    if backend != "vllm" and compiled:
        raise ValueError("--compiled is for --backend vllm only")
    from rl.models.tiny_reasoner import build_tiny_model

    model_dir = str(build_tiny_model())
    if backend == "vllm":
        if profile:  # the stage clock patches the engine core: keep it in this process (GPU default: its own)
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        kw = {} if block_size is None else {"block_size": block_size}
        if compiled:
            kw["enforce_eager"] = False
        t0 = time.perf_counter()
        be = make_backend("vllm", model_dir, dtype="float32", seed=seed, max_model_len=1024, **kw)
        engine_start_s = time.perf_counter() - t0
    else:
        t0 = time.perf_counter()
        be = make_backend("hf", model_dir, batch_size=max(64, n_prompts * (exits + 1)))
        engine_start_s = time.perf_counter() - t0
    report = compare(
        be,
        n_prompts=n_prompts,
        exits=exits,
        max_tokens=max_tokens,
        answer_max_tokens=answer_max_tokens,
        min_ops=min_ops,
        max_ops=max_ops,
        seed=seed,
        repeats=repeats,
        profile=profile,
    )
    return {**report, "compiled": compiled, "engine_start_s": round(engine_start_s, 1)}


def compare(
    be,
    n_prompts: int = 128,
    exits: int = 4,
    max_tokens: int = 320,
    answer_max_tokens: int = 16,
    min_ops: int = 6,
    max_ops: int = 6,
    seed: int = 0,
    repeats: int = 5,
    profile: bool = False,
) -> dict:
    """The bench on a built backend (HF or vLLM): the arms timed ``repeats`` times, the report."""
    from rl.data.prompts import build_prompt
    from rl.data.synthetic_task import TaskConfig, heldout_problems
    from rollout.serial_group import SerialGroupConfig, serial_group_rollout
    from rollout.types import SamplingConfig

    tok = be.tokenizer
    # difficulty-6 problems: reference thinking about 220 tokens (sampled traces skip some re-checks)
    problems = heldout_problems(n_prompts, config=TaskConfig(min_ops=min_ops, max_ops=max_ops))
    prompts = [tok(build_prompt(tok, p.problem), add_special_tokens=False)["input_ids"] for p in problems]
    sampling = SamplingConfig(max_tokens=max_tokens, temperature=1.0, seed=seed)
    cfg = SerialGroupConfig(num_exits=exits, answer_max_tokens=answer_max_tokens)
    serial_group_rollout(be, prompts[:4], SamplingConfig(max_tokens=16, temperature=1.0), cfg)  # warm-up
    # each timed run starts from an empty prefix cache (vLLM; HF keeps none between calls)
    vllm = be.capabilities.prefix_cache
    reset_cache = be.reset_prefix_cache

    arms = _arms(be, prompts, sampling, cfg, exits, seed, block_aligned=profile and vllm)
    walls: dict[str, list[float]] = {k: [] for k in arms}
    last: dict[str, object] = {}
    order = list(arms)
    for r in range(repeats):
        for name in order[r % len(order) :] + order[: r % len(order)]:  # each repeat starts with another arm
            reset_cache()
            t0 = time.perf_counter()
            last[name] = arms[name]()
            walls[name].append(time.perf_counter() - t0)
    s, p, alone = last["serial"], last["parallel"], last["full_only"]
    median = {k: statistics.median(w) for k, w in walls.items()}
    serial_wall, parallel_wall, full_only_wall = median["serial"], median["parallel"], median["full_only"]
    profiled = None
    if profile and vllm:
        profiled = _profile(be, prompts, sampling, cfg, exits, seed)
    elif profile:
        profiled = _profile_hf_branches(be, prompts, sampling, cfg, seed, repeats)
    full = [x for x in s.sequences if x.is_full]
    serial_tokens = s.stats["full_tokens"] + s.stats["branch_tokens"]
    return {
        "backend": be.name,
        "prompts": n_prompts,
        "group": f"serial 1 full + {exits} exits vs parallel {exits + 1} full",
        "mean_think_tokens_full": sum(x.think_tokens for x in full) / max(1, len(full)),
        "serial_tokens": serial_tokens,
        "parallel_tokens": p.stats["full_tokens"],
        "serial_wall_s": round(serial_wall, 3),
        "parallel_wall_s": round(parallel_wall, 3),
        "token_ratio": round(serial_tokens / max(1, p.stats["full_tokens"]), 3),
        "wall_ratio": round(serial_wall / parallel_wall, 3),
        "wall_ratio_runs": [round(a / b, 3) for a, b in zip(walls["serial"], walls["parallel"])],
        "repeats": repeats,
        "full_only_wall_s": round(full_only_wall, 3),
        "full_only_tokens": sum(len(g.completion_ids) for g in alone),
        "full_only_ratio": round(full_only_wall / parallel_wall, 3),
        **{k: v for k, v in s.stats.items() if k.startswith(("branch_prompt", "branch_cache"))},
        **(
            {"branch_uncached_prompt_tokens": s.stats["branch_prompt_tokens"] - s.stats["branch_cached_tokens"]}
            if "branch_prompt_tokens" in s.stats  # backends that report their prefix-cache hits
            else {}
        ),
        **(_block_aligned_report(last, median, parallel_wall) if "block_aligned" in last else {}),
        "block_size": be.kv_block_size,
        "threads": os.environ.get("OMP_NUM_THREADS"),
        **({"profile": profiled} if profiled else {}),
    }


def _arms(be, prompts, sampling, cfg, exits: int, seed: int, block_aligned: bool = False) -> dict:
    """The bench's runs, each a call: the serial group, the parallel group, and the serial group's
    full rollouts alone (same sampling, samples of their own: their tokens say how close); with
    ``block_aligned`` (vLLM, ``--profile``) the serial group once more with its cuts on KV-block
    boundaries (``BlockAlignedCuts``)."""
    from rollout.serial_group import parallel_group_rollout, serial_group_rollout

    arms = {
        "serial": lambda: serial_group_rollout(be, prompts, sampling, cfg, seed=seed),
        "parallel": lambda: parallel_group_rollout(be, prompts, sampling, exits + 1),
        "full_only": lambda: be.generate(prompts, sampling),
    }
    if block_aligned:
        aligned = BlockAlignedCuts(be, be.kv_block_size)
        arms["block_aligned"] = lambda: serial_group_rollout(aligned, prompts, sampling, cfg, seed=seed)
    return arms


def _block_aligned_report(last: dict, median: dict, parallel_wall: float) -> dict:
    """The block-aligned serial group's median wall, its ratio to the parallel group's (what the
    serial group would cost if the prefix cache held every branch's whole prefix) and, from its
    last run, the branch prompt tokens it still computed (the exit prompts)."""
    batch, wall = last["block_aligned"], median["block_aligned"]
    return {
        "block_aligned_wall_s": round(wall, 3),
        "block_aligned_ratio": round(wall / parallel_wall, 3),
        "block_aligned_uncached_prompt_tokens": batch.stats["branch_prompt_tokens"]
        - batch.stats["branch_cached_tokens"],
        "block_aligned_branches": sum(1 for x in batch.sequences if not x.is_full),
    }


def _profile_hf_branches(be, prompts, sampling, cfg, seed: int, repeats: int) -> dict:
    """HF: the serial group's branch phase (``generate_branches`` from the full rollouts' own KV)
    timed on one set of requests and KV, ``repeats`` times interleaved, as one padded batch and in
    the backend's buckets of similar cuts (``rollout/backends/branch_buckets.py``): the median
    seconds of each, their ratio, and the buckets' sizes and cut ranges."""
    from rollout.serial_group import serial_group_rollout

    seen = {}
    generate_branches = be.generate_branches

    def keep(requests, sampling, kv_of=None):
        seen.update(requests=requests, sampling=sampling, kv_of=kv_of)
        return generate_branches(requests, sampling, kv_of=kv_of)

    be.generate_branches = keep
    try:
        serial_group_rollout(be, prompts, sampling, cfg, seed=seed)
    finally:
        del be.generate_branches
    if not seen:  # no full rollout left a thinking to branch from
        return {"branches": 0}
    requests, answer, kv_of = seen["requests"], seen["sampling"], seen["kv_of"]
    cost = be.branch_bucket_cost
    walls: dict[str, list[float]] = {"one_batch": [], "buckets": []}
    try:
        for r in range(repeats):
            for name in ("one_batch", "buckets")[:: 1 if r % 2 == 0 else -1]:
                be.branch_bucket_cost = float("inf") if name == "one_batch" else cost
                t0 = time.perf_counter()
                be.generate_branches(requests, answer, kv_of=kv_of)
                walls[name].append(time.perf_counter() - t0)
    finally:
        be.branch_bucket_cost = cost
    cuts = [c for r in requests for c in r.cuts]
    buckets = be.branch_buckets(cuts, len(requests[0].suffix_ids), answer.max_tokens)  # as the backend split them
    one, bucketed = statistics.median(walls["one_batch"]), statistics.median(walls["buckets"])
    return {
        "branches": len(cuts),
        "kv_from_full_rollouts": kv_of is not None,
        "one_batch_s": round(one, 3),
        "buckets_s": round(bucketed, 3),
        "buckets_vs_one_batch": round(bucketed / one, 3),
        "bucket_rows": [len(b) for b in buckets],
        "bucket_cut_ranges": [[cuts[b[0]], cuts[b[-1]]] for b in buckets],
        "bucket_cost": cost,
    }


def _profile(be, prompts, sampling, cfg, exits: int, seed: int) -> dict:
    """vLLM: one more run of each arm (the block-aligned serial group too) with the engine's stages
    clocked (rl/bench/engine_profile.py), the serial group's extra over its full rollouts alone
    (what the branches cost, stage by stage), the engine's fixed and per-row cost of a decode
    step, and the cost of a prefill token with the forward's rate against a plain matmul's
    (``branch_prefill_ratio``: the branches' prompt tokens at that cost, over the parallel wall)."""
    from rl.bench.engine_profile import (
        STAGES,
        EngineStageClock,
        explain_wall_ratio,
        fit_step_cost,
        per_step_cost,
        prefill_cost,
    )

    clock = EngineStageClock(be.llm)
    out = {}
    for name, run in _arms(be, prompts, sampling, cfg, exits, seed, block_aligned=True).items():
        be.llm.reset_prefix_cache()
        with clock.measure():
            run()
        out[name] = clock.report()
    ser, alone = out["serial"], out["full_only"]
    out["branches_extra"] = {
        "wall_s": round(ser["wall_s"] - alone["wall_s"], 3),
        "stages_s": {k: round(ser["stages_s"][k] - alone["stages_s"][k], 3) for k in (*STAGES, "other")},
        **{k: ser.get(k, 0) - alone.get(k, 0) for k in ("steps", "rows", "prefill_tokens", "tokens", "requests")},
    }
    out["per_step"] = per_step_cost(be, prompts[0], rows=len(prompts))
    out["prefill"] = prefill_cost(be)
    # the step cost these runs imply (full rollouts alone vs the parallel group: both decode-bound)
    out["step_cost_fit"] = fit_step_cost(alone, out["parallel"])
    # the branches' prompt tokens at the measured cost of a prefill token, over the parallel wall
    branch_prefill_s = out["branches_extra"]["prefill_tokens"] * out["prefill"]["wall_us_per_token"] / 1e6
    out["wall_ratio_explained"] = {
        **explain_wall_ratio(ser, out["parallel"], out["step_cost_fit"]),
        "branch_prefill_ratio": round(branch_prefill_s / out["parallel"]["wall_s"], 3),
    }
    return out


class BlockAlignedCuts(RolloutBackend):
    """A streaming backend whose serial-group branches are cut at a KV-block boundary instead of
    their sampled position: the nearest boundary at or below the cut that lies past the prompt
    (else the first one past it), at most the full sequence. Every branch prompt but its exit
    prompt is then a prefix-cache hit, so the serial group's wall shows what the partial blocks
    cost. A bench what-if: the branches' answers are not the sampled exits'."""

    name = "block_aligned"

    def __init__(self, backend: RolloutBackend, block: int):
        self.backend, self.block = backend, block

    # every call but generate_then_branch goes to the wrapped backend unchanged
    tokenizer = property(lambda self: self.backend.tokenizer)
    capabilities = property(lambda self: self.backend.capabilities)
    num_layers = property(lambda self: self.backend.num_layers)

    def generate(self, prompt_ids, sampling):
        return self.backend.generate(prompt_ids, sampling)

    def generate_branches(self, requests, sampling):
        return self.backend.generate_branches(requests, sampling)

    def generate_first_finish(self, prompt_ids, sampling, finishers=1):
        return self.backend.generate_first_finish(prompt_ids, sampling, finishers)

    def decide_plans(self, prompt_ids):
        return self.backend.decide_plans(prompt_ids)

    def generate_routed(self, prompt_ids, sampling, plans, ignore_eos=False, group_by_plan=True):
        return self.backend.generate_routed(prompt_ids, sampling, plans, ignore_eos, group_by_plan)

    def load_weights(self, named_tensors):
        self.backend.load_weights(named_tensors)

    def aligned(self, cut: int, prompt_len: int, total: int) -> int:
        b = self.block
        first = -(-(prompt_len + 1) // b) * b  # the first boundary past the prompt
        return min(total, max(first, cut // b * b))

    def generate_then_branch(self, prompt_ids, sampling, make_request, answer_sampling):
        def request(i, g):
            r = make_request(i, g)
            cuts = [self.aligned(c, len(g.prompt_ids), len(r.base_ids)) for c in r.cuts]
            return dataclasses.replace(r, cuts=cuts)

        return self.backend.generate_then_branch(prompt_ids, sampling, request, answer_sampling)
