"""What a generation costs in forward FLOPs, from the model's config and what actually ran.

``generation_flops`` is the one measure: every prompt and generated token through the layer passes
its plan executed (a repeated layer counted twice, a skipped one not at all; no plan: every layer
once), attention's context term per pass, the LM head on every generated token, the routers on the
prompt and, where a separate pass decided the plan, that pass. ``plan_flops_ratio`` compares routed
sequences with the same sequences through the full model. Everything is a plain function of the
config's shapes, so it works for any decoder (dense, MoE, sliding windows, GQA) routed or not.
"""

from __future__ import annotations


def _head_dims(config) -> tuple[int, int]:
    """(query width, key/value width) of one attention layer."""
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return config.num_attention_heads * hd, kv_heads * hd


def mlp_weights(config) -> int:
    """Weights one token multiplies through in a layer's MLP: a gated MLP (3 x hidden x intermediate),
    or for a mixture of experts its top-k experts, its shared expert and its gate."""
    d = config.hidden_size
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    if experts and top_k:
        inter = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
        shared = getattr(config, "shared_expert_intermediate_size", None) or 0
        return top_k * 3 * d * inter + 3 * d * shared + d * experts
    return 3 * d * config.intermediate_size


def layer_flops(config, tokens: int, context_sum: int) -> float:
    """FLOPs of one layer pass over ``tokens`` tokens whose attention contexts sum to ``context_sum``:
    2 x (q, k, v, o and MLP weights) per token + 4 x (query width) per attended position
    (scores and the weighted sum)."""
    d = config.hidden_size
    q, kv = _head_dims(config)
    weights = d * q + 2 * d * kv + q * d + mlp_weights(config)
    return 2.0 * weights * tokens + 4.0 * q * context_sum


def context_sum(first: int, last: int, window: int | None = None) -> int:
    """Attended positions summed over the tokens at positions ``first .. last - 1`` (causal: the
    token at position i attends to i + 1 positions, at most ``window``)."""

    def tri(k: int) -> int:
        return k * (k + 1) // 2

    if window is None:
        return tri(last) - tri(first)
    below = min(last, window)  # positions i < window attend to i + 1 positions
    return (tri(below) - tri(first) if first < below else 0) + max(0, last - max(first, window)) * window


def router_flops(hidden_size: int, router_hidden: int, num_windows: int, prompt_tokens: int) -> float:
    """One router on one prompt: the window means (one add per element) and the MLP per window."""
    return prompt_tokens * hidden_size + num_windows * 2.0 * (hidden_size * router_hidden + router_hidden * 3)


def generation_flops(
    config,
    prompt_tokens: int,
    completion_tokens: int,
    plan: list[int] | None = None,
    router_shape: tuple[int, int] | None = None,
    deciding_pass: bool = False,
) -> float:
    """Forward FLOPs of one sequence: ``prompt_tokens`` then ``completion_tokens`` generated.

    Per layer pass (``plan[l]`` passes of layer l; no plan: one each):
        2 * W * (P + C) + 4 * q * sum_i min(i + 1, window_l)
    with W the layer's weights per token, q its query width, i over the sequence's positions; plus
    the LM head (2 * hidden * vocab per generated token), the routers on the prompt
    (``router_shape`` = (router hidden, windows): one router per layer) and, with ``deciding_pass``,
    the prompt once more through the plan's passes (a serving front end that decides the plan in a
    request of its own).
    """
    from rollout.routing.routed_model import layer_windows

    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    L = config.num_hidden_layers
    passes = plan if plan is not None else [1] * L
    windows = layer_windows(config, L)
    n = prompt_tokens + completion_tokens
    total = 0.0
    for count, window in zip(passes, windows):
        if count:
            per_pass = layer_flops(config, n, context_sum(0, n, window))
            if deciding_pass:
                per_pass += layer_flops(config, prompt_tokens, context_sum(0, prompt_tokens, window))
            total += count * per_pass
    total += 2.0 * config.hidden_size * config.vocab_size * completion_tokens
    if router_shape is not None:
        total += L * router_flops(config.hidden_size, *router_shape, prompt_tokens)
    return total


def plan_flops_ratio(
    plans: list[list[int]],
    prompt_lens: list[int],
    completion_lens: list[int],
    config,
    router_hidden: int = 128,
    num_windows: int = 8,
    routed: bool = True,
) -> float:
    """FLOPs of routed generation over those of the full model on the same sequences
    (``generation_flops`` with and without each plan; the routers counted when ``routed``)."""
    shape = (router_hidden, num_windows) if routed else None
    full = sum(generation_flops(config, p, c) for p, c in zip(prompt_lens, completion_lens))
    routed_total = sum(
        generation_flops(config, p, c, plan, shape) for plan, p, c in zip(plans, prompt_lens, completion_lens)
    )
    return routed_total / full if full else 1.0
