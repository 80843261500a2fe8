"""A decoder-only HF model (``model.model.layers``, Qwen3 first) run under per-row layer plans.

A plan ``[B, L]`` holds one action per row and layer (0 skip, 1 execute, 2 execute twice). It is
decided once, at prefill, by the routers (router ``l`` runs on the hidden states entering layer
``l``, so the plan is built in order inside the prefill) or given by the caller, and it stays fixed
for the whole generation: the layers a row skips never write or read its cache, and a repeated
layer's second pass has its own cache slot (slot ``L + l``, same weights).

Two execution modes, equal in outputs:
- ``masked``: every row runs every layer any row of the batch runs; ``where(run, layer(h), h)``
  keeps the right output. The exact reference; saves nothing.
- ``grouped``: each layer pass runs on exactly the rows whose plan runs it (an index-select, the
  layer, an index-copy back), and its cache slot holds only those rows. Real compute saved, and one
  call per layer pass however many distinct plans the batch holds.

Positions come from the attention mask (left or right padding), the attention mask is built here
(it never depends on any layer's cache length), so skipping layer 0 is as safe as any other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rollout.routing.routers import REPEAT, LayerRouters, choose_actions

MODES = ("grouped", "masked")


@dataclass
class RoutedCache:
    """KV cache of one routed batch: slot ``l`` = layer l's pass, slot ``L + l`` = its repeat; each
    slot holds the keys/values [rows, kv_heads, T, hd] of the rows that run it."""

    plan: torch.Tensor | None = None  # [B, L], fixed at prefill
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def seen_tokens(self) -> int:
        return next(iter(self.kv.values()))[0].shape[2] if self.kv else 0


class _Slot:
    """What a layer's attention sees as ``past_key_values``: one slot of a ``RoutedCache``."""

    def __init__(self, cache: RoutedCache, slot: int):
        self.cache, self.slot = cache, slot

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int = 0, *args, **kwargs):
        old = self.cache.kv.get(self.slot)
        if old is not None:
            k, v = torch.cat([old[0], k], 2), torch.cat([old[1], v], 2)
        self.cache.kv[self.slot] = (k, v)
        return k, v


@dataclass
class RoutedOutput:
    logits: torch.Tensor | None  # [B, T', V]; None when the head was not applied (``lm_head=False``)
    plan: torch.Tensor  # [B, L]
    cache: RoutedCache | None
    layer_inputs: list[torch.Tensor] | None = None  # per layer, the hidden states entering it [B, T, d]
    router_logits: torch.Tensor | None = None  # [B, L, 3] when the routers decided
    hidden: torch.Tensor | None = None  # [B, T', d] the last layer's output before the final norm


def attention_mask_4d(mask2d: torch.Tensor, num_new: int, window: int | None = None) -> torch.Tensor:
    """Boolean [B, 1, Q, K] mask (True = attend) for the last ``num_new`` of ``K`` positions:
    causal, padding-aware and, for a sliding-window layer, only the last ``window`` columns
    (``q - window < k <= q``, as transformers' ``sliding_window_overlay``); a padding query attends
    to itself only (no all-masked rows)."""
    B, K = mask2d.shape
    keys = torch.arange(K, device=mask2d.device)
    queries = keys[K - num_new :]
    causal = keys[None, :] <= queries[:, None]  # [Q, K]
    if window is not None:
        causal = causal & (keys[None, :] > queries[:, None] - window)
    allowed = causal[None] & mask2d.bool()[:, None, :]  # [B, Q, K]
    allowed = allowed | (keys[None, :] == queries[:, None])[None]
    return allowed[:, None]


def layer_windows(config, num_layers: int) -> list[int | None]:
    """Each layer's sliding window (None: full attention), as the model's own mask builder applies
    it: ``layer_types`` where the config has them (Qwen2, Qwen3, Gemma-style), else every layer
    slides once ``sliding_window`` is set (Mistral)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types:
        return [window if t == "sliding_attention" else None for t in types[:num_layers]]
    return [window] * num_layers


def mask_for(impl: str, mask2d: torch.Tensor, num_new: int, window: int | None, dtype: torch.dtype):
    """The attention mask a layer of attention implementation ``impl`` expects: a boolean 4-D mask for
    sdpa, an additive float one (0 / dtype min) for eager (which adds the mask to the scores), the
    2-D padding mask for flash attention (it unpads, and applies the window itself)."""
    if "flash" in impl:
        return mask2d
    if impl == "flex_attention":
        raise ValueError("routed execution does not support attn_implementation 'flex_attention': use sdpa or eager")
    allowed = attention_mask_4d(mask2d, num_new, window)
    if impl == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def positions_from_mask(mask2d: torch.Tensor, num_new: int) -> torch.Tensor:
    """Position ids [B, Q] of the last ``num_new`` columns: the rank among the row's real tokens."""
    return (mask2d.long().cumsum(-1) - 1).clamp(min=0)[:, -num_new:]


class RoutedModel:
    """Per-row layer plans over a HF causal LM; see the module docstring."""

    def __init__(self, model, routers: LayerRouters | None = None, mode: str = "grouped"):
        if mode not in MODES:
            raise ValueError(f"routed mode {mode!r}: expected one of {MODES}")
        self.model = model
        self.decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        if not hasattr(self.decoder, "layers"):
            raise TypeError(f"{type(model).__name__}: no decoder `layers`; routed execution needs a decoder-only model")
        self.layers = list(self.decoder.layers)
        self.routers = routers
        self.mode = mode
        if routers is not None and routers.num_layers != len(self.layers):
            raise ValueError(f"routers have {routers.num_layers} layers, the model {len(self.layers)}")
        self.windows = layer_windows(model.config, len(self.layers))
        self.attn_impl = getattr(model.config, "_attn_implementation", None) or "sdpa"

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def full_plan(self, batch: int) -> torch.Tensor:
        return torch.ones(batch, self.num_layers, dtype=torch.long, device=self.device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        plan: torch.Tensor | None = None,
        cache: RoutedCache | None = None,
        use_cache: bool = False,
        route_mask: torch.Tensor | None = None,
        skip_bias: float = 0.0,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
        logits_to_keep: int = 0,
        output_layer_inputs: bool = False,
        lm_head: bool = True,
    ) -> RoutedOutput:
        """One forward of ``input_ids`` [B, T] (the newest T columns of ``attention_mask`` [B, K]).

        Plan: ``plan`` if given, else the cache's (decode), else decided now by the routers over
        ``route_mask`` [B, T] (default: the real tokens), else all-execute."""
        B, T = input_ids.shape
        if cache is None and use_cache:
            cache = RoutedCache()
        if plan is None and cache is not None and cache.plan is not None:
            plan = cache.plan
        deciding = plan is None and self.routers is not None
        if plan is None and not deciding:
            plan = self.full_plan(B)
        if plan is not None:
            plan = plan.to(input_ids.device)  # plans built on the CPU index the model's tensors
        if deciding and route_mask is None:
            route_mask = attention_mask[:, -T:]
        h = self.decoder.embed_tokens(input_ids)
        pos = positions_from_mask(attention_mask, T)
        cos, sin = self.decoder.rotary_emb(h, pos)
        masks = {w: mask_for(self.attn_impl, attention_mask, T, w, h.dtype) for w in set(self.windows)}
        L = self.num_layers
        columns, router_logits, inputs = [], [], []
        for layer_idx, layer in enumerate(self.layers):
            if deciding:
                z = self.routers.layer_logits(layer_idx, h, route_mask)  # [B, 3]
                router_logits.append(z)
                a = choose_actions(z, skip_bias, temperature, generator)
                columns.append(a)
            else:
                a = plan[:, layer_idx]
            if output_layer_inputs:
                inputs.append(h)
            mask = masks[self.windows[layer_idx]]
            for rep, slot in ((1, layer_idx), (REPEAT, L + layer_idx)):
                run = a >= rep  # [B]
                if not bool(run.any()):
                    continue
                kv = _Slot(cache, slot) if cache is not None else None
                if self.mode == "masked":
                    out = layer(h, attention_mask=mask, position_embeddings=(cos, sin), past_key_values=kv)
                    h = torch.where(run[:, None, None], out, h)
                elif bool(run.all()):
                    h = layer(h, attention_mask=mask, position_embeddings=(cos, sin), past_key_values=kv)
                else:
                    rows = run.nonzero().squeeze(-1)
                    out = layer(
                        h[rows],
                        attention_mask=mask[rows],
                        position_embeddings=(cos[rows], sin[rows]),
                        past_key_values=kv,
                    )
                    h = h.index_copy(0, rows, out)
        if deciding:
            plan = torch.stack(columns, 1)
        if cache is not None:
            cache.plan = plan
        h = h[:, -logits_to_keep:] if logits_to_keep else h
        return RoutedOutput(
            logits=self.model.lm_head(self.decoder.norm(h)) if lm_head else None,
            plan=plan,
            cache=cache,
            layer_inputs=inputs if output_layer_inputs else None,
            router_logits=torch.stack(router_logits, 1) if deciding else None,
            hidden=h,
        )

    __call__ = forward

    def readout(self, hidden: torch.Tensor, targets: torch.Tensor | None = None):
        """The model's exit head (final norm + LM head) on hidden states [S, N, d] of any layers,
        statistics only (``kernels.exit_head.layer_readout``)."""
        from kernels.exit_head import layer_readout

        norm = self.decoder.norm
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
        return layer_readout(hidden, self.model.lm_head.weight, norm.weight, targets, eps=eps)

    @torch.no_grad()
    def decide_plans(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, skip_bias: float = 0.0, temperature: float = 0.0
    ) -> torch.Tensor:
        """The routers' plans [B, L] for prompts (one routed prefill, logits dropped)."""
        if self.routers is None:
            return self.full_plan(input_ids.shape[0])
        return self.forward(
            input_ids, attention_mask, skip_bias=skip_bias, temperature=temperature, logits_to_keep=1
        ).plan
