"""Rollout engines as Ray actors, for runs that outgrow one process or machine.

``RayRolloutPool`` starts ``num_actors`` actors (one per GPU or tensor-parallel group on GPU
clusters; plain CPU actors here), each holding one backend built by ``BackendSpec``. A request is
sharded over the actors; a shard whose actor died is retried on a restarted actor, so every prompt
comes back (in order) or the call raises naming the prompts it could not generate.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from rollout.backends.base import Capabilities, RolloutBackend
from rollout.types import BranchRequest, Generation, SamplingConfig


@dataclass
class BackendSpec:
    """What each actor builds: ``kind`` 'hf' or 'vllm', the model path and backend kwargs."""

    kind: str
    model: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self):
        if self.kind == "hf":
            from rollout.backends.hf import HFBackend

            return HFBackend.from_pretrained(self.model, **self.kwargs)
        if self.kind == "vllm":
            from rollout.backends.vllm import VLLMBackend

            return VLLMBackend.from_pretrained(self.model, **self.kwargs)
        raise ValueError(f"unknown backend kind {self.kind!r} (expected 'hf' or 'vllm')")


class RolloutActor:
    """Holds one backend; methods mirror the backend interface."""

    def __init__(self, spec: BackendSpec):
        import torch

        torch.set_num_threads(1)
        self.backend = spec.build()

    def pid(self) -> int:
        import os

        return os.getpid()

    def generate_per_prompt(self, prompts, sampling):
        """Generations regrouped per prompt of this shard."""
        out = [[] for _ in prompts]
        for g in self.backend.generate(prompts, sampling):
            out[g.prompt_index].append(g)
        return out

    def generate_routed_per_prompt(self, items, sampling, group_by_plan):
        """(prompt, plan) items -> their generations each."""
        out = [[] for _ in items]
        gens = self.backend.generate_routed(
            [p for p, _ in items], sampling, [plan for _, plan in items], group_by_plan=group_by_plan
        )
        for g in gens:
            out[g.prompt_index].append(g)
        return out

    def call(self, method: str, *args):
        """Run one of the interface calls the pool shards (``ACTOR_CALLS``) on this actor's backend."""
        calls = {
            "generate_per_prompt": self.generate_per_prompt,
            "generate_routed_per_prompt": self.generate_routed_per_prompt,
            "generate_branches": self.backend.generate_branches,
            "generate_first_finish": self.backend.generate_first_finish,
            "decide_plans": self.backend.decide_plans,
            "load_weights": self.backend.load_weights,
        }
        if method not in calls:
            raise ValueError(f"unknown actor call {method!r}; known: {sorted(calls)}")
        return calls[method](*args)


class RolloutError(RuntimeError):
    """Generation failed for the named prompts after all retries."""


class RayRolloutPool(RolloutBackend):
    name = "ray"
    capabilities = Capabilities()

    def __init__(
        self,
        spec: BackendSpec,
        num_actors: int = 1,
        address: str | None = None,
        num_gpus_per_actor: float = 0.0,
        max_retries: int = 2,
    ):
        import ray
        from transformers import AutoTokenizer

        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
        self.spec = spec
        self.max_retries = max_retries
        self.tokenizer = AutoTokenizer.from_pretrained(spec.model)
        self._remote = ray.remote(num_cpus=0, num_gpus=num_gpus_per_actor)(RolloutActor)
        self.actors = [self._start() for _ in range(num_actors)]
        self.restarts = 0
        self._last_weights = None

    def _start(self):
        return self._remote.remote(self.spec)

    def _restart(self, i: int):
        import ray

        try:
            ray.kill(self.actors[i])
        except Exception:
            pass
        self.actors[i] = self._start()
        self.restarts += 1
        if self._last_weights is not None:  # a fresh actor must not roll out stale weights
            ray.get(self.actors[i].call.remote("load_weights", self._last_weights))

    def _sharded(self, method: str, items: list, *extra) -> list:
        """Run ``method(shard, *extra)`` on each actor's shard; retry shards of dead actors."""
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

        k = len(self.actors)
        shards = [list(range(i, len(items), k)) for i in range(k)]
        results: dict[int, Any] = {}
        pending = {i: s for i, s in enumerate(shards) if s}
        for _attempt in range(self.max_retries + 1):
            futures = {
                i: self.actors[i].call.remote(method, [items[j] for j in idx], *extra) for i, idx in pending.items()
            }
            failed = {}
            for i, fut in futures.items():
                try:
                    for j, r in zip(pending[i], ray.get(fut)):
                        results[j] = r
                except (RayActorError, ActorDiedError, ActorUnavailableError):
                    failed[i] = pending[i]
                    self._restart(i)
                except RayTaskError as e:  # the backend itself raised: not retried, the prompts are named
                    raise RolloutError(f"{method} failed on actor {i} for items {pending[i]}: {e.cause!r}") from e
            if not failed:
                break
            pending = failed
        else:
            lost = sorted(j for idx in pending.values() for j in idx)
            raise RolloutError(
                f"rollout actors kept dying; prompts {lost} not generated after {self.max_retries} retries"
            )
        return [results[j] for j in range(len(items))]

    @staticmethod
    def _prompt_major(per_prompt: list[list[Generation]]) -> list[Generation]:
        """Generations regrouped per prompt -> one flat, prompt-major list indexed by prompt."""
        out = []
        for pi, gens in enumerate(per_prompt):
            for g in gens:
                g.prompt_index = pi
                out.append(g)
        return out

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[Generation]:
        """``sampling.n`` generations per prompt, prompt-major, whatever actor made them."""
        return self._prompt_major(self._sharded("generate_per_prompt", prompt_ids, sampling))

    def generate_branches(self, requests: list[BranchRequest], sampling: SamplingConfig) -> list[list[Generation]]:
        return self._sharded("generate_branches", requests, sampling)

    def generate_first_finish(
        self, prompt_ids: list[list[int]], sampling: SamplingConfig, finishers: int = 1
    ) -> list[list[Generation]]:
        return self._sharded("generate_first_finish", prompt_ids, sampling, finishers)

    @functools.cached_property
    def num_layers(self) -> int:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.spec.model).num_hidden_layers

    def decide_plans(self, prompt_ids: list[list[int]]) -> list[list[int]]:
        """The actors' routers' plans per prompt (routed actors: ``exitrl export --routers`` folders)."""
        return self._sharded("decide_plans", prompt_ids)

    def generate_routed(
        self,
        prompt_ids: list[list[int]],
        sampling: SamplingConfig,
        plans: list[list[int]],
        ignore_eos: bool = False,
        group_by_plan: bool = True,
    ) -> list[Generation]:
        """Each prompt under its plan (``VLLMBackend.generate_routed``), sharded with its plan;
        prompt-major, whatever actor made them."""
        if ignore_eos:
            raise NotImplementedError("RayRolloutPool.generate_routed: ignore_eos")
        from rollout.routing.routers import check_plans

        keys = check_plans(prompt_ids, plans, self.num_layers)
        items = [(list(p), list(plan)) for p, plan in zip(prompt_ids, keys)]
        return self._prompt_major(self._sharded("generate_routed_per_prompt", items, sampling, group_by_plan))

    def load_weights(self, named_tensors) -> None:
        """Broadcast weights to every actor (one object in the Ray store, read by all)."""
        import ray

        weights = [(n, t.detach().cpu()) for n, t in named_tensors]
        self._last_weights = weights
        ref = ray.put(weights)
        ray.get([a.call.remote("load_weights", ref) for a in self.actors])

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []
