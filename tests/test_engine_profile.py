"""bench rollout --profile: the engine stage clock on the shared vLLM engine (exact counts of steps,
rows, prefill tokens and requests; stages partition the wall; the engine left unpatched), and the
step-cost fit against hand-computed numbers."""

import pytest

from rl.bench.engine_profile import (
    STAGES,
    EngineStageClock,
    explain_wall_ratio,
    fit_step_cost,
    forward_flops_per_token,
    prefill_cost,
)


def test_fit_step_cost_recovers_a_known_step_cost():
    # wall = 2 ms * steps + 50 us * rows
    small = {"steps": 100, "rows": 1000, "wall_s": 0.2 + 0.05}
    large = {"steps": 200, "rows": 10000, "wall_s": 0.4 + 0.5}
    fit = fit_step_cost(small, large)
    assert fit == {"fixed_ms": 2.0, "per_row_us": 50.0}
    # serial: 150 steps, 2000 rows -> 0.3 + 0.1 = 0.4 s; parallel 0.9 s
    serial = {"steps": 150, "rows": 2000, "wall_s": 0.4}
    why = explain_wall_ratio(serial, large, fit)
    assert why == {
        "serial_fixed_share": 0.75,  # 0.3 / 0.4
        "parallel_fixed_share": 0.444,  # 0.4 / 0.9
        "rows_ratio": 0.2,
        "steps_ratio": 0.75,
        "wall_ratio_fitted": 0.444,  # 0.4 / 0.9
    }
    # runs that counted their forward tokens also give that ratio: 5000 / 12000
    why = explain_wall_ratio({**serial, "tokens": 5000}, {**large, "tokens": 12000}, fit)
    assert why["tokens_ratio"] == 0.417
    with pytest.raises(ValueError, match="proportional"):
        fit_step_cost(small, {"steps": 200, "rows": 2000, "wall_s": 0.5})


def test_forward_flops_per_token_by_hand():
    from types import SimpleNamespace

    # the demo's tiny reasoner: h 128, 4 layers, 4 query / 2 KV heads of 32, MLP 512
    cfg = SimpleNamespace(
        hidden_size=128,
        num_hidden_layers=4,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
    )
    # per layer: qkv 128*32*8 = 32768, out 4*32*128 = 16384, MLP 3*128*512 = 196608 -> 245760
    assert forward_flops_per_token(cfg) == 2 * 4 * 245760 == 1_966_080
    # no KV heads or head_dim given: multi-head attention, head_dim = h / heads
    mha = SimpleNamespace(hidden_size=64, num_hidden_layers=1, intermediate_size=128, num_attention_heads=4)
    assert forward_flops_per_token(mha) == 2 * (64 * 16 * 12 + 4 * 16 * 64 + 3 * 64 * 128)


def test_prefill_cost_on_the_shared_engine(vllm_engine):
    from types import SimpleNamespace

    rep = prefill_cost(SimpleNamespace(llm=vllm_engine), prompt_len=32, prompts=8)
    # eight fresh 32-token prompts, all prefilled in one step (no cache hit: the cache was reset)
    assert rep["prefill_tokens"] == 256 and rep["steps"] == 1
    assert rep["wall_us_per_token"] >= rep["forward_us_per_token"] > 0
    assert rep["matmul_gflops"] > 0
    assert rep["forward_vs_matmul"] == pytest.approx(rep["forward_gflops"] / rep["matmul_gflops"], rel=0.02)


def test_block_aligned_cuts_move_to_a_block_boundary_past_the_prompt():
    from rl.bench.rollout import BlockAlignedCuts

    a = BlockAlignedCuts(backend=None, block=32)
    # prompt of 70 tokens: the first boundary past it is 96
    assert [a.aligned(c, prompt_len=70, total=300) for c in (71, 95, 96, 127, 128, 150)] == [96, 96, 96, 96, 128, 128]
    assert a.aligned(100, prompt_len=70, total=90) == 90  # never past the sequence
    assert a.aligned(70, prompt_len=64, total=300) == 96  # a prompt ending on a boundary: the next one


def test_engine_stage_clock_counts_one_generate_exactly(vllm_engine):
    from vllm import SamplingParams

    prompts = [[5 + i, 17, 23, 40 + i, 9] for i in range(3)]  # 5 tokens each, no shared block
    sp = SamplingParams(max_tokens=6, ignore_eos=True, temperature=1.0, detokenize=False, logprobs=0)
    vllm_engine.reset_prefix_cache()
    clock = EngineStageClock(vllm_engine)
    assert clock.device.type == "cpu" and clock.sync is None  # the forward waits for no kernels here
    with clock.measure():
        vllm_engine.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    rep = clock.report()
    # one step prefills all three (and samples their first tokens), five more decode them
    assert rep["steps"] == 6
    assert rep["rows"] == 18
    assert rep["prefill_tokens"] == 15
    assert rep["tokens"] == 15 + 5 * 3  # the prefills, then five decode steps of three rows
    assert rep["requests"] == 3
    assert set(rep["stages_s"]) == {*STAGES, "other"}
    assert all(clock.seconds[k] > 0 for k in ("add_request", "schedule", "model_forward", "sample", "update"))
    assert sum(rep["stages_s"].values()) == pytest.approx(rep["wall_s"], abs=0.005)
    # the clocks were instance attributes: gone after the block, the engine's own methods back
    core = vllm_engine.llm_engine.engine_core.engine_core
    assert "schedule" not in vars(core.scheduler)
    assert "add_request" not in vars(vllm_engine.llm_engine)


def test_bench_rollout_compare_on_the_shared_engine(vllm_engine, quick_model_dir):
    from transformers import AutoTokenizer

    from rl.bench.rollout import compare
    from rollout.backends.vllm import VLLMBackend

    be = VLLMBackend(vllm_engine, AutoTokenizer.from_pretrained(quick_model_dir))
    n = 6
    rep = compare(be, n_prompts=n, exits=2, max_tokens=40, answer_max_tokens=8, repeats=2, profile=True)
    assert rep["backend"] == "vllm" and rep["prompts"] == n and rep["repeats"] == 2
    assert len(rep["wall_ratio_runs"]) == 2
    assert rep["wall_ratio"] == pytest.approx(rep["serial_wall_s"] / rep["parallel_wall_s"], abs=0.01)
    assert rep["full_only_ratio"] == pytest.approx(rep["full_only_wall_s"] / rep["parallel_wall_s"], abs=0.01)
    assert 0 < rep["serial_tokens"] < rep["parallel_tokens"]
    assert rep["branch_uncached_prompt_tokens"] == rep["branch_prompt_tokens"] - rep["branch_cached_tokens"] > 0
    # the block-aligned what-if computes each branch's exit prompt, at most one partial block more
    # (a cut at the sequence's end, whose last token was never fed back)
    from rollout.thinking import DEFAULT_EXIT_PROMPT, encode_in_context

    S, aligned = len(encode_in_context(be.tokenizer, DEFAULT_EXIT_PROMPT)), rep["block_aligned_branches"]
    assert 0 < S * aligned <= rep["block_aligned_uncached_prompt_tokens"] <= (S + rep["block_size"]) * aligned
    assert rep["block_aligned_ratio"] == pytest.approx(rep["block_aligned_wall_s"] / rep["parallel_wall_s"], abs=0.01)
    prof = rep["profile"]
    assert prof["block_aligned"]["requests"] == n + aligned
    # requests: one per prompt for the full rollouts and for the parallel group (n=3 fans out inside
    # the engine), one more per exit branch in the serial group
    assert prof["full_only"]["requests"] == n and prof["parallel"]["requests"] == n
    branches = prof["serial"]["requests"] - n
    assert 0 < branches <= 2 * n
    assert prof["branches_extra"]["requests"] == branches
    # every request of an empty cache prefills at least one token; the parallel group's rows are 3x
    assert prof["full_only"]["prefill_tokens"] > 0
    assert prof["parallel"]["rows"] > 2 * prof["full_only"]["rows"]
    why = prof["wall_ratio_explained"]
    assert why["rows_ratio"] == round(prof["serial"]["rows"] / prof["parallel"]["rows"], 3)
    assert why["steps_ratio"] == round(prof["serial"]["steps"] / prof["parallel"]["steps"], 3)
    assert set(prof["step_cost_fit"]) == {"fixed_ms", "per_row_us"}
    # every run's forward tokens: its decode rows plus its prefill tokens, the serial group's more
    # than its full rollouts alone by the branches' prompts and answers
    assert why["tokens_ratio"] == round(prof["serial"]["tokens"] / prof["parallel"]["tokens"], 3)
    extra = prof["branches_extra"]
    assert extra["tokens"] == prof["serial"]["tokens"] - prof["full_only"]["tokens"] >= extra["prefill_tokens"] > 0
    wall_per_token = prof["prefill"]["wall_us_per_token"] / 1e6
    assert why["branch_prefill_ratio"] == pytest.approx(
        extra["prefill_tokens"] * wall_per_token / prof["parallel"]["wall_s"], abs=0.002
    )
