"""Ray rollout actors (HF backend inside each actor: vLLM-in-Ray is too heavy for 2 cores; the
same pool runs vLLM actors on GPU machines): sharding, order, and a killed actor's prompts retried."""

import pytest

from rl.data.prompts import build_prompt
from rollout.types import SamplingConfig


@pytest.fixture(scope="module")
def pool(quick_model_dir):
    import ray

    from rollout.backends.ray_pool import BackendSpec, RayRolloutPool

    p = RayRolloutPool(BackendSpec("hf", str(quick_model_dir)), num_actors=2)
    yield p
    p.shutdown()
    ray.shutdown()


def test_ray_pool_survives_a_killed_actor(pool, quick_model_dir):
    import ray

    from rl.data.synthetic_task import heldout_problems
    from rollout.backends.hf import HFBackend

    tok = pool.tokenizer
    prompts = [tok(build_prompt(tok, p.problem), add_special_tokens=False)["input_ids"] for p in heldout_problems(5)]
    greedy = SamplingConfig(max_tokens=12, temperature=0, n=2)
    local = HFBackend.from_pretrained(str(quick_model_dir)).generate(prompts, greedy)
    first = pool.generate(prompts, greedy)
    assert [g.prompt_index for g in first] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert [g.completion_ids for g in first] == [g.completion_ids for g in local]

    ray.kill(pool.actors[1])  # an actor dies between calls: its shard is retried on a restarted one
    again = pool.generate(prompts, greedy)
    assert pool.restarts == 1
    assert [g.completion_ids for g in again] == [g.completion_ids for g in local]


def test_unknown_backend_kind_is_named():
    from rollout.backends.ray_pool import BackendSpec

    with pytest.raises(ValueError, match="tensorrt"):
        BackendSpec("tensorrt", "x").build()


def test_a_generation_error_names_the_prompts(pool):
    from rollout.backends.ray_pool import RolloutError

    with pytest.raises(RolloutError, match=r"items \[0\]"):
        pool.generate([[10**9]], SamplingConfig(max_tokens=2, temperature=0))  # token id beyond the vocabulary


def test_ray_pool_generates_under_given_layer_plans(pool, quick_model_dir):
    """Joint training's layer variants through the pool: each prompt travels with its plan to
    whatever actor takes it, and comes back in order, equal to one local routed backend's rows
    (plans that skip a layer give other tokens than all-execute)."""
    from rl.data.synthetic_task import heldout_problems
    from rollout.backends.hf import HFBackend

    tok = pool.tokenizer
    prompts = [tok(build_prompt(tok, p.problem), add_special_tokens=False)["input_ids"] for p in heldout_problems(4)]
    L = pool.num_layers
    plans = [[1] * L, [0] + [1] * (L - 1), [1] * L, [1, 2] + [1] * (L - 2)]
    greedy = SamplingConfig(max_tokens=10, temperature=0)
    local = HFBackend.from_pretrained(str(quick_model_dir)).generate_routed(prompts, greedy, plans)
    got = pool.generate_routed(prompts, greedy, plans, group_by_plan=False)
    assert [g.prompt_index for g in got] == [0, 1, 2, 3]
    assert [g.plan for g in got] == plans
    assert [g.completion_ids for g in got] == [g.completion_ids for g in local]
    full = HFBackend.from_pretrained(str(quick_model_dir)).generate(prompts, greedy)
    assert any(a.completion_ids != b.completion_ids for a, b in zip(local, full))
