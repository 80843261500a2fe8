"""Hugging Face transformers backend (CPU and GPU; the reference backend).

Decoding runs ``rollout.backends.decode_loop``: ``model.generate``'s sampling, draw for draw, with
finished rows leaving the batch. Serial-group branches reuse the shared prefix: one prefill of the
group's longest branch prefix, whose KV cache is cut for each branch, so the prompt and thinking are
never recomputed. First Finish Search stops a prompt's samples as soon as one of them finishes.
"""

from __future__ import annotations

import torch

from rollout.backends.base import Capabilities, RolloutBackend
from rollout.backends.branch_buckets import DEFAULT_BUCKET_COST, min_cost_buckets
from rollout.types import BranchRequest, Generation, SamplingConfig


class HFBackend(RolloutBackend):
    """Generation on a transformers model; returns per-token sampler log-probs and finish reasons.

    ``logits_processor``: optional ``fn(step, rows, logits) -> logits`` applied to the raw logits of
    every decode step before temperature and top-p (``rows``: each batch row's index in the call's
    batch, since finished rows leave it)."""

    name = "hf"

    def __init__(
        self,
        model,
        tokenizer,
        batch_size: int = 64,
        routers=None,
        routed_mode: str = "grouped",
        skip_bias: float = 0.0,
        branch_bucket_cost: float = DEFAULT_BUCKET_COST,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.eos_ids = self._eos_ids()
        self.routed = None
        self.routed_mode = routed_mode
        self.skip_bias = skip_bias
        self.logits_processor = None
        # padded row-columns one more bucket of branches must save (rollout/backends/branch_buckets.py)
        self.branch_bucket_cost = branch_bucket_cost
        if routers is not None:
            from rollout.routing.routed_model import RoutedModel

            self.routed = RoutedModel(model, routers.to(next(model.parameters()).device), mode=routed_mode)

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32, routers=None, **kw) -> HFBackend:
        """``routers``: ``LayerRouters`` or a folder with ``routers.safetensors`` (generation then
        routes layers). On
        CPU the model attends through ``kernels.gqa_attention`` (no copy of grouped KV heads)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from kernels.gqa_attention import register

        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=register()).eval()
        if isinstance(routers, str):
            from rollout.routing.routers import LayerRouters

            routers = LayerRouters.load(routers)
        return cls(model, tok, routers=routers, **kw)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            streams_branches=True,
            routed=self.routed is not None,
            decides_on_generate=self.routed is not None,
            shares_learner_weights=True,
        )

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def local_model(self):
        return self.model

    @property
    def model_config(self):
        return self.model.config

    @property
    def router_shape(self) -> tuple[int, int] | None:
        if self.routed is None:
            return None
        c = self.routed.routers.config
        return c.router_hidden, c.num_windows

    def with_skip_bias(self, bias: float | None) -> HFBackend:
        """The same model and tokenizer; routed with ``bias`` on every skip logit, or unrouted (None)."""
        view = HFBackend(
            self.model,
            self.tokenizer,
            batch_size=self.batch_size,
            routers=None if bias is None or self.routed is None else self.routed.routers,
            routed_mode=self.routed_mode,
            skip_bias=0.0 if bias is None else bias,
            branch_bucket_cost=self.branch_bucket_cost,
        )
        view.logits_processor = self.logits_processor
        return view

    def _routed(
        self, prompts, sampling: SamplingConfig, route_lens=None, stop_groups=None, seed=None, finishers=1, plans=None
    ):
        """Routed decoding of ``prompts`` as one batch: plans decided at prefill, or ``plans`` [B, L]
        given (then no routers are needed)."""
        from rollout.routing.routed_generation import routed_generate
        from rollout.routing.routed_model import RoutedModel

        return routed_generate(
            self.routed or RoutedModel(self.model, None, mode="grouped"),
            prompts,
            max_tokens=sampling.max_tokens,
            eos_ids=self.eos_ids,
            pad_id=self.pad_id,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed if seed is None else seed,
            route_lens=route_lens,
            skip_bias=self.skip_bias,
            stop_groups=stop_groups,
            finishers=finishers,
            plans=plans,
        )

    def _eos_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id
        ids = list(ids) if isinstance(ids, (list, tuple)) else [ids]
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return {i for i in ids if i is not None}

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def _decode(self, ids, attn, sampling: SamplingConfig, **kw):
        from rollout.backends.decode_loop import decode

        return decode(
            self.model,
            ids,
            attn,
            max_tokens=sampling.max_tokens,
            eos_ids=self.eos_ids,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            logits_processor=self.logits_processor,
            **kw,
        )

    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        from rollout.routing.routed_generation import left_pad

        return left_pad(prompts, self.pad_id, next(self.model.parameters()).device)

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[Generation]:
        """``sampling.n`` completions for each prompt (prompt-major order)."""
        return self._generate(prompt_ids, sampling)[0]

    def _generate(self, prompt_ids, sampling: SamplingConfig, keep_kv: bool = False):
        """(generations, per generation its KV rows (``DecodedRow.kv``) when ``keep_kv``, else None)."""
        out: list[Generation] = []
        kv: list | None = [] if keep_kv and self.routed is None else None
        flat = [(i, p) for i, p in enumerate(prompt_ids) for _ in range(sampling.n)]
        gen = torch.Generator(device="cpu").manual_seed(sampling.seed)
        for start in range(0, len(flat), self.batch_size):
            chunk = flat[start : start + self.batch_size]
            if self.routed is not None:
                seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
                for (pi, p), row in zip(chunk, self._routed([p for _, p in chunk], sampling, seed=seed)):
                    out.append(
                        Generation(list(p), row.tokens, row.logprobs, row.finish, prompt_index=pi, plan=row.plan)
                    )
                continue
            ids, attn = self._left_pad([p for _, p in chunk])
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            for (pi, p), row in zip(chunk, self._decode(ids, attn, sampling, keep_kv=kv is not None)):
                out.append(Generation(list(p), row.tokens, row.logprobs, row.finish, prompt_index=pi))
                if kv is not None:
                    kv.append(row.kv)
        return out, kv

    @torch.no_grad()
    def _prefill(self, seqs: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One forward over right-padded ``seqs``; per layer (keys, values) [B, kv_heads, L, hd]."""
        from transformers import DynamicCache

        L = max(len(x) for x in seqs)
        device = next(self.model.parameters()).device
        ids = torch.full((len(seqs), L), self.pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for r, x in enumerate(seqs):
            ids[r, : len(x)] = torch.tensor(x, dtype=torch.long)
            attn[r, : len(x)] = 1
        cache = DynamicCache(config=self.model.config)
        self.model(input_ids=ids.to(device), attention_mask=attn.to(device), past_key_values=cache, use_cache=True)
        return [(layer.keys, layer.values) for layer in cache.layers]

    @torch.no_grad()
    def generate_branches(
        self, requests: list[BranchRequest], sampling: SamplingConfig, kv_of: dict | None = None
    ) -> list[list[Generation]]:
        """Branch ``base_ids[:cut] + suffix_ids`` of every request, decoded as one batch without
        recomputing any shared prefix: each request's ``base_ids`` is prefilled once (or its KV
        comes from ``kv_of[request]``, per layer (keys, values) [H, t, hd], e.g. kept by the full
        rollout's decoding), and every branch starts from that KV cut at its position
        (left-aligned into a padded batch cache; positions come from the attention mask, so RoPE
        stays exact)."""
        flat = [(ri, c) for ri, r in enumerate(requests) for c in r.cuts]
        out: list[list[Generation]] = [[] for _ in requests]
        if not flat:
            return out
        device = next(self.model.parameters()).device
        torch.manual_seed(sampling.seed)
        rows_per_call = max(1, self.batch_size)
        if self.routed is not None:  # each branch prefilled whole under its prompt's plan
            for s0 in range(0, len(flat), rows_per_call):
                chunk = flat[s0 : s0 + rows_per_call]
                seqs = [requests[ri].base_ids[:c] + list(requests[ri].suffix_ids) for ri, c in chunk]
                lens = [requests[ri].route_len or c for ri, c in chunk]
                rows = self._routed(seqs, sampling, route_lens=lens, seed=sampling.seed + s0)
                for (ri, _), seq, row in zip(chunk, seqs, rows):
                    out[ri].append(
                        Generation(seq, row.tokens, row.logprobs, row.finish, prompt_index=ri, plan=row.plan)
                    )
            return out
        for s0 in range(0, len(flat), rows_per_call):
            chunk = flat[s0 : s0 + rows_per_call]
            if kv_of is None:
                reqs = sorted({ri for ri, _ in chunk})
                prefilled = self._prefill([requests[ri].base_ids[: max(requests[ri].cuts)] for ri in reqs])
                row_of = {ri: k for k, ri in enumerate(reqs)}
                # per request, per layer (keys, values) [H, t, hd] of its base prefix (right-padded rows)
                kv_rows = {ri: [(k[row_of[ri]], v[row_of[ri]]) for k, v in prefilled] for ri in reqs}
            else:
                kv_rows = kv_of
            rows = self._decode_branch_buckets(chunk, requests, kv_rows, sampling, device)
            for (ri, c), row in zip(chunk, rows):
                out[ri].append(
                    Generation(
                        requests[ri].base_ids[:c] + list(requests[ri].suffix_ids),
                        row.tokens,
                        row.logprobs,
                        row.finish,
                        prompt_index=ri,
                    )
                )
        return out

    def branch_buckets(self, cuts: list[int], suffix_len: int, max_tokens: int) -> list[list[int]]:
        """Indices into ``cuts`` grouped into the padded batches their branches decode in: a
        suffix (exit prompt) of ``suffix_len`` tokens, answers of at most ``max_tokens``
        (``branch_buckets.min_cost_buckets`` at this backend's ``branch_bucket_cost``)."""
        return min_cost_buckets(cuts, extra=suffix_len + max_tokens / 2, bucket_cost=self.branch_bucket_cost)

    def _decode_branch_buckets(self, chunk, requests, kv_rows, sampling: SamplingConfig, device):
        """The branches ``(request, cut)`` of ``chunk`` decoded in buckets of similar cuts
        (``branch_buckets.min_cost_buckets``: less left padding), rows returned in ``chunk``'s order."""
        suffix = len(requests[chunk[0][0]].suffix_ids)
        if any(len(requests[ri].suffix_ids) != suffix for ri, _ in chunk):
            raise ValueError("branch suffixes of one batch must have equal length")
        rows = [None] * len(chunk)
        for bucket in self.branch_buckets([c for _, c in chunk], suffix, sampling.max_tokens):
            decoded = self._decode_branches([chunk[b] for b in bucket], requests, kv_rows, sampling, device)
            for b, row in zip(bucket, decoded):
                rows[b] = row
        return rows

    def _decode_branches(self, chunk, requests, kv_rows, sampling: SamplingConfig, device):
        """One padded batch of branches ``(request, cut)`` from their requests' KV rows (the cache
        built in place: ``decode_loop.left_padded_cache``)."""
        from rollout.backends.decode_loop import left_padded_cache

        suffixes = [requests[ri].suffix_ids for ri, _ in chunk]
        S = len(suffixes[0])
        P = max(c for _, c in chunk)
        prefixes = [[(k[:, :c], v[:, :c]) for k, v in kv_rows[ri]] for ri, c in chunk]
        cache = left_padded_cache(self.model.config, prefixes, reserve=S + sampling.max_tokens)
        ids = torch.full((len(chunk), P + S), self.pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for b, (ri, c) in enumerate(chunk):
            full = requests[ri].base_ids[:c] + suffixes[b]
            ids[b, P + S - len(full) :] = torch.tensor(full, dtype=torch.long)
            attn[b, P + S - len(full) :] = 1
        return self._decode(ids.to(device), attn.to(device), sampling, cache=cache)

    @torch.no_grad()
    def generate_then_branch(
        self, prompt_ids: list[list[int]], sampling: SamplingConfig, make_request, answer_sampling: SamplingConfig
    ) -> tuple[list[Generation], list[list[Generation]]]:
        """Serial groups: the full rollouts, then every exit branch decoded from the KV cache the
        full rollout's own decoding left (kept per row as it finished), so nothing of prompt +
        thinking is computed twice. Routed models fall back to generate + generate_branches."""
        fulls, kv = self._generate(prompt_ids, sampling, keep_kv=self.routed is None)
        requests = [make_request(i, g) for i, g in enumerate(fulls)]
        if not any(r.cuts for r in requests):
            return fulls, [[] for _ in requests]
        usable = kv is not None and all(kv[i][0][0].shape[1] >= max(r.cuts, default=0) for i, r in enumerate(requests))
        return fulls, self.generate_branches(requests, answer_sampling, kv_of=dict(enumerate(kv)) if usable else None)

    @torch.no_grad()
    def generate_first_finish(
        self, prompt_ids: list[list[int]], sampling: SamplingConfig, finishers: int = 1
    ) -> list[list[Generation]]:
        """FFS: ``sampling.n`` samples per prompt decoded together; a prompt's rows stop as soon as
        ``finishers`` of them have finished. Unfinished rows come back with finish reason 'abort'."""
        out: list[list[Generation]] = [[] for _ in prompt_ids]
        flat = [(i, p) for i, p in enumerate(prompt_ids) for _ in range(sampling.n)]
        per = max(sampling.n, (self.batch_size // sampling.n) * sampling.n)
        torch.manual_seed(sampling.seed)
        for start in range(0, len(flat), per):
            chunk = flat[start : start + per]
            if self.routed is not None:
                rows = self._routed(
                    [p for _, p in chunk],
                    sampling,
                    stop_groups=[pi for pi, _ in chunk],
                    seed=sampling.seed + start,
                    finishers=finishers,
                )
                for (pi, p), row in zip(chunk, rows):
                    out[pi].append(
                        Generation(list(p), row.tokens, row.logprobs, row.finish, prompt_index=pi, plan=row.plan)
                    )
                continue
            ids, attn = self._left_pad([p for _, p in chunk])
            groups = [pi - chunk[0][0] for pi, _ in chunk]
            for (pi, p), row in zip(chunk, self._decode(ids, attn, sampling, stop_groups=groups, finishers=finishers)):
                out[pi].append(Generation(list(p), row.tokens, row.logprobs, row.finish, prompt_index=pi))
        return out

    # -- layer plans (the interface of routed vLLM engines, ``VLLMBackend.generate_routed``) -----
    @torch.no_grad()
    def decide_plans(self, prompt_ids: list[list[int]]) -> list[list[int]]:
        """The routers' greedy plans [L] per prompt (one routed prefill)."""
        if self.routed is None or self.routed.routers is None:
            raise ValueError("decide_plans: this backend has no routers (HFBackend(..., routers=...))")
        return self.routed.decide_plans(*self._left_pad(prompt_ids)).tolist()

    @torch.no_grad()
    def generate_routed(
        self,
        prompt_ids: list[list[int]],
        sampling: SamplingConfig,
        plans: list[list[int]],
        ignore_eos: bool = False,
        group_by_plan: bool = True,
    ) -> list[Generation]:
        """``sampling.n`` completions of each prompt under its given plan (no routers needed),
        prompt-major; HF batches always mix plans (each row runs its own), whatever ``group_by_plan``."""
        from rollout.routing.routers import check_plans

        if ignore_eos:
            raise NotImplementedError("HFBackend.generate_routed: ignore_eos")
        keys = check_plans(prompt_ids, plans, self.num_layers)
        flat = [i for i in range(len(prompt_ids)) for _ in range(sampling.n)]
        out: list[Generation] = []
        for start in range(0, len(flat), self.batch_size):
            chunk = flat[start : start + self.batch_size]
            given = torch.tensor([keys[i] for i in chunk], dtype=torch.long)
            rows = self._routed([prompt_ids[i] for i in chunk], sampling, seed=sampling.seed + start, plans=given)
            for i, row in zip(chunk, rows):
                out.append(
                    Generation(list(prompt_ids[i]), row.tokens, row.logprobs, row.finish, prompt_index=i, plan=row.plan)
                )
        return out

    def load_weights(self, named_tensors) -> None:
        """Copy weights (name -> tensor, HF names; ``routers.*`` into the routers, if any) into the
        generation model."""
        params = dict(self.model.named_parameters())
        routers = self.routed.routers if self.routed is not None else None
        own = dict(routers.named_parameters()) if routers is not None else {}
        with torch.no_grad():
            for name, t in named_tensors:
                if name in params:
                    params[name].copy_(t.to(params[name].dtype))
                elif name.startswith("routers.") and name[len("routers.") :] in own:
                    p = own[name[len("routers.") :]]
                    p.copy_(t.to(p.dtype))
