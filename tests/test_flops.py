"""``generation_flops`` (the one FLOPs measure of the summary and ``exitrl eval``) against an
independent count: torch's ``FlopCounterMode`` over cached token-by-token decoding of tiny models of
each family (dense, GQA, q/k/v biases, a sliding window of 8, a mixture of experts), and against hand
numbers for plans (skips, repeats) and the routers."""

from __future__ import annotations

import pytest
import torch

from rollout.routing.compute import context_sum, generation_flops, plan_flops_ratio, router_flops
from tests.test_model_families import FAMILIES, tiny_family_model


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_flops_equals_a_flop_counter_over_cached_decoding(family):
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import DynamicCache

    model = tiny_family_model(family, "eager")
    model.config._experts_implementation = "eager"  # the grouped kernels are invisible to the counter
    prompt, completion = 5, 9
    ids = torch.randint(3, 97, (1, prompt + completion), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        for i in range(prompt + completion):  # one token per call: attention over exactly the cached context
            model(input_ids=ids[:, i : i + 1], past_key_values=cache, position_ids=torch.tensor([[i]]))
    c = model.config
    # the counter also sees the LM head on each prompt token (one logits row per call); generation does not
    lm_head_on_prompt = 2 * c.hidden_size * c.vocab_size * prompt
    assert counter.get_total_flops() == generation_flops(c, prompt, completion) + lm_head_on_prompt


def test_plans_windows_and_routers_by_hand():
    from transformers import MistralConfig, Qwen3Config

    c = Qwen3Config(
        vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=4,
    )  # fmt: skip
    # per token per pass: 2 x (q 8*8 + k, v 2*8*4 + o 8*8 + MLP 3*8*16) = 2 * 576 = 1152; attention 4 * 8 = 32
    # per attended position; 10 tokens: 55 positions; LM head 2 * 8 * 100 = 1600 per generated token
    per_pass = 1152 * 10 + 32 * 55
    assert generation_flops(c, 4, 6) == 3 * per_pass + 1600 * 6
    assert generation_flops(c, 4, 6, plan=[2, 0, 1]) == 3 * per_pass + 1600 * 6  # a repeat pays for a skip
    assert generation_flops(c, 4, 6, plan=[0, 1, 0]) == per_pass + 1600 * 6
    # the routers (hidden 16, 2 windows): 3 of them on the 4 prompt tokens, 3 * (4*8 + 2*2*(8*16 + 16*3))
    assert router_flops(8, 16, 2, 4) == 4 * 8 + 2 * 2 * (8 * 16 + 16 * 3)
    assert generation_flops(c, 4, 6, plan=[0, 1, 0], router_shape=(16, 2)) == per_pass + 1600 * 6 + 3 * 736
    # a separate deciding pass: the prompt once more through the plan's passes (4 tokens, 10 positions)
    assert generation_flops(c, 4, 6, plan=[0, 1, 0], deciding_pass=True) == per_pass + 1152 * 4 + 32 * 10 + 9600
    # a sliding window of 4 over 10 tokens: 1 + 2 + 3 + 4 + 6 * 4 = 34 attended positions per pass
    m = MistralConfig(
        vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=4, sliding_window=4,
    )  # fmt: skip
    assert context_sum(0, 10, 4) == 34
    assert generation_flops(m, 4, 6) == 3 * (1152 * 10 + 32 * 34) + 1600 * 6
    # the ratio of routed to full generation on the same sequences
    assert plan_flops_ratio([[0, 1, 0]], [4], [6], c, routed=False) == pytest.approx(
        (per_pass + 9600) / (3 * per_pass + 9600)
    )
