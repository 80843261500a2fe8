"""SDPA attention with grouped KV heads kept grouped on CPU (attention implementation ``sdpa_gqa``).

transformers' ``sdpa`` expands the KV heads to the query heads (``repeat_kv``: a copy of the whole
key and value cache per layer, per decode step) whenever an attention mask is given, because
CUDA's flash kernel falls back to the math kernel for masked GQA. PyTorch's CPU kernel takes a mask
and ``enable_gqa=True`` together and gives bit-identical outputs
(``tests/test_gqa_attention.py``), so on CPU this implementation skips the copy; on any other device
it is transformers' ``sdpa`` unchanged.

``register()`` adds the name to transformers' attention and mask registries (idempotent); load a
model with ``attn_implementation=ATTENTION`` after it.
"""

from __future__ import annotations

import torch

ATTENTION = "sdpa_gqa"


def sdpa_gqa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [B, H, q, hd]
    key: torch.Tensor,  # [B, H_kv, k, hd]
    value: torch.Tensor,  # [B, H_kv, k, hd]
    attention_mask: torch.Tensor | None,  # [B, 1, q, k] bool (True: attend) or None
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Returns ([B, q, H, hd], None), as transformers' attention functions do."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if query.device.type != "cpu" or groups == 1 or kwargs.get("position_bias") is not None or "cache" in kwargs:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = query.shape[2] > 1 and attention_mask is None and is_causal
    out = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        is_causal=is_causal,
        enable_gqa=True,
    )
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register ``sdpa_gqa`` with transformers (attention function + sdpa's mask format); returns
    the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    if ATTENTION not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(ATTENTION, sdpa_gqa_attention)
        AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    return ATTENTION
