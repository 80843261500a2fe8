"""``exitrl bench rollout``: serial groups (1 full + m exits, prefix reused) against parallel groups
of m+1 full rollouts, same prompts, same backend, one run. Prints tokens, wall times and
``wall_ratio = serial / parallel``; ``full_only_ratio``: the serial group's full rollouts alone (its
floor: the branches' share is ``wall_ratio - full_only_ratio``), and the branches' prompt tokens the
prefix cache did not hold (partial KV blocks + the exit prompt, recomputed per branch).
``compiled``: vLLM with torch.compile (``enforce_eager=False``) instead of eager. ``repeats``: the three
timed runs are interleaved that many times, each repeat starting with the next arm (no arm always
pays for running first), and each wall time is the median (on this 2-core machine repeats of one run
differ by up to a tenth of the ratio); ``wall_ratio_runs`` lists every repeat's ratio."""

from __future__ import annotations

import os
import statistics
import time


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
    if backend != "vllm" and (compiled or profile):
        raise ValueError("--compiled and --profile are for --backend vllm only")
    from rl.models.tiny_reasoner import build_tiny_model

    model_dir = str(build_tiny_model())
    if backend == "vllm":
        from rollout.backends.vllm import VLLMBackend

        if profile:  # the stage clock patches the engine core: keep it in this process (GPU default: its own)
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        kw = {} if block_size is None else {"block_size": block_size}
        if compiled:
            kw["enforce_eager"] = False
        t0 = time.perf_counter()
        be = VLLMBackend.from_pretrained(model_dir, dtype="float32", seed=seed, max_model_len=1024, **kw)
        engine_start_s = time.perf_counter() - t0
    else:
        from rollout.backends.hf import HFBackend

        t0 = time.perf_counter()
        be = HFBackend.from_pretrained(model_dir, batch_size=max(64, n_prompts * (exits + 1)))
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
    """The bench on a built backend (HF or vLLM): the three arms timed ``repeats`` times, the report."""
    if profile and not hasattr(be, "llm"):
        raise ValueError("--profile clocks a vLLM engine's stages: not for the HF backend")
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
    reset_cache = be.llm.reset_prefix_cache if hasattr(be, "llm") else lambda: None

    arms = _arms(be, prompts, sampling, cfg, exits, seed)
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
    serial_wall, parallel_wall, full_only_wall = (statistics.median(walls[k]) for k in walls)
    profiled = _profile(be, prompts, sampling, cfg, exits, seed) if profile else None
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
        "block_size": _block_size(be),
        "threads": os.environ.get("OMP_NUM_THREADS"),
        **({"profile": profiled} if profiled else {}),
    }


def _arms(be, prompts, sampling, cfg, exits: int, seed: int) -> dict:
    """The bench's three runs, each a call: the serial group, the parallel group, and the serial
    group's full rollouts alone (same sampling, samples of their own: their tokens say how close)."""
    from rollout.serial_group import parallel_group_rollout, serial_group_rollout

    return {
        "serial": lambda: serial_group_rollout(be, prompts, sampling, cfg, seed=seed),
        "parallel": lambda: parallel_group_rollout(be, prompts, sampling, exits + 1),
        "full_only": lambda: be.generate(prompts, sampling),
    }


def _profile(be, prompts, sampling, cfg, exits: int, seed: int) -> dict:
    """One more run of each arm with the engine's stages clocked (rl/bench/engine_profile.py), the
    serial group's extra over its full rollouts alone (what the branches cost, stage by stage), and
    the engine's fixed and per-row cost of a decode step."""
    from rl.bench.engine_profile import STAGES, EngineStageClock, explain_wall_ratio, fit_step_cost, per_step_cost

    clock = EngineStageClock(be.llm)
    out = {}
    for name, run in _arms(be, prompts, sampling, cfg, exits, seed).items():
        be.llm.reset_prefix_cache()
        with clock.measure():
            run()
        out[name] = clock.report()
    ser, alone = out["serial"], out["full_only"]
    out["branches_extra"] = {
        "wall_s": round(ser["wall_s"] - alone["wall_s"], 3),
        "stages_s": {k: round(ser["stages_s"][k] - alone["stages_s"][k], 3) for k in (*STAGES, "other")},
        **{k: ser.get(k, 0) - alone.get(k, 0) for k in ("steps", "rows", "prefill_tokens", "requests")},
    }
    out["per_step"] = per_step_cost(be, prompts[0], rows=len(prompts))
    # the step cost these runs imply (full rollouts alone vs the parallel group: both decode-bound)
    out["step_cost_fit"] = fit_step_cost(alone, out["parallel"])
    out["wall_ratio_explained"] = explain_wall_ratio(ser, out["parallel"], out["step_cost_fit"])
    return out


def _block_size(be) -> int | None:
    """The KV block size the engine runs with (prefix-cache hits come in whole blocks)."""
    llm = getattr(be, "llm", None)
    return None if llm is None else llm.llm_engine.vllm_config.cache_config.block_size
