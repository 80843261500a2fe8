"""The routed model inside vLLM: a decoder whose requests each run their own layer plan.

``RoutedDecoder`` is written once over the decoder-layer interface vLLM's families share
(``layer(positions, h, residual)``; ``self_attn(positions, x)`` with its ``attn`` module), and mixed
into each family's vLLM class: ``RoutedQwen3ForCausalLM``, ``RoutedQwen2ForCausalLM`` (q/k/v biases),
``RoutedLlamaForCausalLM``, ``RoutedMistralForCausalLM`` (sliding windows: each repeat's attention takes
its layer's window) and ``RoutedQwen3MoeForCausalLM``. Registered out of tree
(``rollout.routing.vllm_plugin``, entry point ``vllm.general_plugins``) as ``ExitrlRouted<Base>``, the
``architectures`` name ``exitrl export`` writes for a model with routers (``routers.safetensors`` +
``routers.json`` in the folder; plain exports keep their own).

How a plan travels. vLLM gives a model no request ids, so the model reads them where the engine
keeps them: the worker's model runner (attached at load by the plugin) lays out each step's tokens
request by request in ``input_batch.req_ids`` order, ``query_start_loc`` of the attention metadata
cutting the flat token batch into those requests. A request carries its plan in
``SamplingParams.extra_args["exitrl_plan"]`` (rollouts: the serial group's plan, decided by the
learner's routers); without one, the routers decide it at the request's first prefill from its
prompt exactly as the transformers model does (``RoutedModel``: window means of each layer's
inputs, layer by layer) and the model keeps it under the request id for every later step,
preemption and recomputation included (recomputing from prompt + output would otherwise route on
tokens that are not the prompt). A decision needs the whole prompt in one forward: a prefix-cache
hit or a chunked prefill would hide part of it, so requests left to decide carry a ``cache_salt``
of their own (``vllm_plugin.decide_salt``) and the engine's token budget must hold a prompt (an error names the
request otherwise).

KV soundness. A layer's KV depends on the plan of every layer below it, so blocks may only be
shared between requests with the same plan: every routed request carries ``cache_salt`` = its plan
(``vllm_plugin.plan_salt``), which vLLM folds into the block hashes.

Execution. Per layer pass (repeats: the layer's own attention forward through a second attention
module with its own KV cache, shared weights): no request runs it -> skipped, all do -> run, some
do -> run on the whole batch and kept where the plan runs it (vLLM's attention takes the batch as
scheduled). Savings therefore come from batches whose requests agree; ``VLLMBackend`` submits
requests grouped by plan, one engine call per plan. The repeat modules take KV cache like the
layers themselves: a routed engine holds half the tokens of a plain one in the same KV space.
Eager mode (``enforce_eager``): the control flow changes with the plans, which neither
``torch.compile``'s graph nor CUDA graphs can follow.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM
from vllm.model_executor.models.qwen3_moe import Qwen3MoeForCausalLM

from rollout.routing.routers import REPEAT, ROUTERS_CONFIG, ROUTERS_FILE, LayerRouters, choose_actions
from rollout.routing.vllm_plugin import PLAN_KEY, ROUTED_PREFIX

KEEP_DECIDED = 65536  # decided plans kept (request id -> plan), oldest dropped first


class RoutedDecoder:
    """Per-request layer plans over a vLLM decoder-only model (mixed in before the family's class)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config, cache = vllm_config.model_config.hf_config, vllm_config.cache_config
        arch = ROUTED_PREFIX + type(self).__mro__[2].__name__
        self.num_layers = config.num_hidden_layers
        folder = Path(vllm_config.model_config.model)
        for f in (ROUTERS_FILE, ROUTERS_CONFIG):
            if not (folder / f).exists():
                raise FileNotFoundError(f"{folder}: {arch} needs {f} beside the model (`exitrl export`)")
        self.routers = LayerRouters.load(folder, device=self.model.embed_tokens.weight.device)
        if self.routers.num_layers != self.num_layers:
            raise ValueError(f"{folder}: routers for {self.routers.num_layers} layers, model has {self.num_layers}")
        # a repeated layer's second pass: own KV cache (slot L + l, as in the transformers model),
        # the layer's own heads, scale and sliding window
        L = self.num_layers
        self.repeat_attn = nn.ModuleList(
            Attention(
                layer.self_attn.attn.num_heads,
                layer.self_attn.attn.head_size,
                layer.self_attn.scaling,
                num_kv_heads=layer.self_attn.attn.num_kv_heads,
                cache_config=cache,
                per_layer_sliding_window=getattr(layer.self_attn.attn, "sliding_window", None),
                prefix=f"exitrl_repeat.{L + i}.attn",
            )
            for i, layer in enumerate(self.model.layers)
        )
        self.runner = None  # the worker's model runner, attached by the plugin after load
        self.decided: OrderedDict[str, list[int]] = OrderedDict()
        self.layer_passes = 0  # layer passes run (for tests and benches)

    def attach_runner(self, runner) -> None:
        self.runner = runner

    def plans_of(self, request_ids: list[str]) -> list[list[int] | None]:
        """The decided plans of requests by the ids the caller gave them (the engine runs them as
        ``<id>-<suffix>``); None where none was decided."""
        by_external = {k.rsplit("-", 1)[0]: v for k, v in self.decided.items()}
        return [self.decided.get(r, by_external.get(r)) for r in request_ids]

    def plans_with_tags(self, tags: list[str]) -> list[list[int] | None]:
        """The latest decided plan of a request whose id contains each tag (``exitrl serve`` tags
        its decide requests: the OpenAI server prefixes and suffixes the ids it is given)."""
        out: list[list[int] | None] = []
        for tag in tags:
            hit = next((v for k, v in reversed(self.decided.items()) if tag in k), None)
            out.append(list(hit) if hit is not None else None)
        return out

    # -- plans -------------------------------------------------------------------------------
    def _request_plans(self, qsl: list[int]) -> tuple[list[list[int] | None], list[tuple[int, str, int]]]:
        """One plan per request of this step (batch order); None, listed in ``undecided`` as
        (batch index, request id, prompt length), for requests the routers decide now."""
        if self.runner is None:
            raise RuntimeError(
                f"{type(self).__name__}: no model runner attached (load it through the exitrl vLLM plugin)"
            )
        req_ids = self.runner.input_batch.req_ids[: len(qsl) - 1]
        plans: list[list[int] | None] = []
        undecided = []
        for r, rid in enumerate(req_ids):
            state = self.runner.requests[rid]
            given = (state.sampling_params.extra_args or {}).get(PLAN_KEY) if state.sampling_params else None
            if given is not None:
                if len(given) != self.num_layers:
                    raise ValueError(f"request {rid}: plan of {len(given)} layers for a {self.num_layers}-layer model")
                plans.append([int(a) for a in given])
            elif rid in self.decided:
                plans.append(self.decided[rid])
            else:
                n = len(state.prompt_token_ids or [])
                if state.num_computed_tokens != 0 or qsl[r + 1] - qsl[r] < n:
                    raise RuntimeError(
                        f"request {rid}: its plan must be decided from the whole prompt in one prefill, but "
                        f"{state.num_computed_tokens} of {n} prompt tokens were cached and {qsl[r + 1] - qsl[r]} "
                        "scheduled (give it cache_salt=decide_salt(id) and max_num_batched_tokens >= the prompt)"
                    )
                plans.append(None)
                undecided.append((r, rid, n))
        return plans, undecided

    def _decide_layer(self, layer_idx: int, h: torch.Tensor, qsl: list[int], undecided, plans) -> None:
        """Router ``layer_idx``'s greedy action for each undecided request, from the window means of
        its prompt's hidden states entering the layer (as ``RoutedModel`` decides inside its prefill)."""
        for r, _, n in undecided:
            seg = h[qsl[r] : qsl[r] + n][None]  # [1, n, d]
            z = self.routers.layer_logits(layer_idx, seg, torch.ones(1, n, dtype=torch.long, device=h.device))
            plans[r].append(int(choose_actions(z)[0]))

    # -- execution ---------------------------------------------------------------------------
    # The stream is vLLM's (h, residual) pair (the hidden state is h + residual; None = 0), so a
    # pass uses the fused add + RMSNorm as the plain model does. Those norms may work in place:
    # inputs whose old values are still needed (masked rows) are cloned first.
    def _pass(self, layer_idx: int, repeat: bool, positions: torch.Tensor, h, res):
        """One pass of decoder layer ``layer_idx`` -> (h, residual); a repeat runs the layer's own
        forward with its attention module swapped for the repeat's (own KV cache, shared weights),
        so each family's q/k/v biases, q/k norms and rotary are applied as in its first pass."""
        layer = self.model.layers[layer_idx]
        if not repeat:
            return layer(positions, h, res)
        sa = layer.self_attn
        first = sa.attn
        sa.attn = self.repeat_attn[layer_idx]
        try:
            return layer(positions, h, res)
        finally:
            sa.attn = first

    def _run_layer(self, layer_idx, h, res, positions, acts, qsl):
        """Layer ``layer_idx`` (and its repeat) under per-request actions ``acts`` -> (h, residual)."""
        for rep in (1, REPEAT):
            run = [a >= rep for a in acts]
            if not any(run):
                continue
            self.layer_passes += 1
            if all(run):
                h, res = self._pass(layer_idx, rep == REPEAT, positions, h, res)
                continue
            keep = torch.zeros(h.shape[0], 1, dtype=torch.bool, device=h.device)
            for r, go in enumerate(run):
                if go:
                    keep[qsl[r] : qsl[r + 1]] = True
            old_h, old_res = h.clone(), (torch.zeros_like(h) if res is None else res.clone())
            new_h, new_res = self._pass(layer_idx, rep == REPEAT, positions, h, res)
            h, res = torch.where(keep, new_h, old_h), torch.where(keep, new_res, old_res)
        return h, res

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        h = inputs_embeds if inputs_embeds is not None else self.model.embed_input_ids(input_ids)
        res = None
        meta = get_forward_context().attn_metadata
        if not meta:  # profiling / dummy runs: every layer, no requests
            for layer_idx in range(self.num_layers):
                h, res = self._pass(layer_idx, False, positions, h, res)
            return self.model.norm(h, res)[0]
        m = next(iter(meta.values())) if isinstance(meta, dict) else meta
        qsl = m.query_start_loc.tolist()
        plans, undecided = self._request_plans(qsl)
        for r, _, _ in undecided:
            plans[r] = []
        qsl = qsl[:-1] + [h.shape[0]]  # padded tokens ride with the last request
        for layer_idx in range(self.num_layers):
            if undecided:
                self._decide_layer(layer_idx, h if res is None else h + res, qsl, undecided, plans)
            h, res = self._run_layer(layer_idx, h, res, positions, [p[layer_idx] for p in plans], qsl)
        for r, rid, _ in undecided:
            self.decided[rid] = plans[r]
            if len(self.decided) > KEEP_DECIDED:
                self.decided.popitem(last=False)
        return self.model.norm(h) if res is None else self.model.norm(h, res)[0]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The decoder's weights as the family's own model loads them; the routers' tensors into the
        routers: ``routers.*`` (weight sync of a joint run) or bare ``w1``... (vLLM's loader reads
        every ``*.safetensors`` of the folder, ``routers.safetensors`` included)."""
        own = {k for k, _ in self.routers.named_parameters()}
        rest, routed = [], {}
        for name, t in weights:
            key = name[len("routers.") :] if name.startswith("routers.") else name
            if key in own:
                routed[key] = t
            else:
                rest.append((name, t))
        loaded = super().load_weights(rest)
        if routed:
            missing = own - set(routed)
            if missing:
                raise ValueError(f"router weights incomplete: missing {sorted(missing)}")
            # through each parameter's weight loader: an in-place reload (weight sync) swaps the
            # parameters for placeholders and copies only what arrives through their loaders
            from vllm.model_executor.model_loader.weight_utils import default_weight_loader

            for k, p in list(self.routers.named_parameters()):
                getattr(p, "weight_loader", default_weight_loader)(p, routed[k].to(p.dtype))
        names = {f"routers.{k}" for k in own}
        return loaded | names | {n for n, _ in self.repeat_attn.named_parameters(prefix="repeat_attn")}


class RoutedQwen3ForCausalLM(RoutedDecoder, Qwen3ForCausalLM):
    pass


class RoutedQwen2ForCausalLM(RoutedDecoder, Qwen2ForCausalLM):
    pass


class RoutedLlamaForCausalLM(RoutedDecoder, LlamaForCausalLM):
    pass


class RoutedMistralForCausalLM(RoutedDecoder, MistralForCausalLM):
    pass


class RoutedQwen3MoeForCausalLM(RoutedDecoder, Qwen3MoeForCausalLM):
    pass
