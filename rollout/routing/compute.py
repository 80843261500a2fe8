"""What a layer plan costs: executed passes and layer FLOPs (attention and routers included)."""

from __future__ import annotations


def layer_flops(config, tokens: int, context_sum: int) -> float:
    """FLOPs of one layer pass over ``tokens`` tokens whose attention contexts sum to ``context_sum``:
    2 x (q, k, v, o and MLP weights) per token + 4 x (heads x head_dim) per attended position
    (scores and the weighted sum)."""
    d = config.hidden_size
    hd = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q = config.num_attention_heads * hd
    kv = config.num_key_value_heads * hd
    weights = d * q + 2 * d * kv + q * d + 3 * d * config.intermediate_size
    return 2.0 * weights * tokens + 4.0 * q * context_sum


def router_flops(hidden_size: int, router_hidden: int, num_windows: int, prompt_tokens: int) -> float:
    """One router on one prompt: the window means (one add per element) and the MLP per window."""
    return prompt_tokens * hidden_size + num_windows * 2.0 * (hidden_size * router_hidden + router_hidden * 3)


def plan_flops_ratio(
    plans: list[list[int]],
    prompt_lens: list[int],
    completion_lens: list[int],
    config,
    router_hidden: int = 128,
    num_windows: int = 8,
    routed: bool = True,
) -> float:
    """Layer FLOPs of routed generation over those of the full model on the same sequences: each
    sequence's prompt and completion tokens run ``sum(plan)`` layer passes instead of L, and (when
    ``routed``) every router runs once on the prompt."""
    L = config.num_hidden_layers
    full = routed_total = 0.0
    for plan, p, c in zip(plans, prompt_lens, completion_lens):
        n = p + c
        per_pass = layer_flops(config, n, n * (n + 1) // 2)
        full += L * per_pass
        routed_total += sum(plan) * per_pass
        if routed:
            routed_total += L * router_flops(config.hidden_size, router_hidden, num_windows, p)
    return routed_total / full if full else 1.0
