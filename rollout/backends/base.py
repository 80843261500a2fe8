"""The one interface every rollout backend implements (HF transformers, vLLM, the Ray pool).

Callers (the trainer's rollout and layer stages, serial and FFS groups, ``exitrl eval``, the benches)
use only what is declared here; what a backend can do beyond the common calls is stated in its
``capabilities``, never probed with ``hasattr``.

    generate               n completions per prompt, prompt-major
    generate_branches      serial-group exit branches from given cut points
    generate_then_branch   full rollouts, then their branches (a streaming backend starts a
                           group's branches as soon as its full rollout ends)
    generate_first_finish  FFS: a prompt's samples stop once ``finishers`` of them have finished
    decide_plans           the routers' layer plan per prompt (routed backends)
    generate_routed        completions under given layer plans
    load_weights           learner weights in (HF names; ``routers.*`` for the routers)
    sleep / wake_up        free accelerator memory while the learner steps (no-op without it)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from rollout.types import BranchRequest, Generation, SamplingConfig


@dataclass(frozen=True)
class Capabilities:
    """What a backend does beyond the common calls."""

    streams_branches: bool = False  # generate_then_branch overlaps branches with the full rollouts
    routed: bool = False  # it holds routers: decide_plans works, plain generate may route layers
    decides_on_generate: bool = False  # plain generate decides each prompt's plan (routed evaluation)
    sleeps: bool = False  # sleep / wake_up move memory (a GPU engine with sleep mode)
    prefix_cache: bool = False  # reset_prefix_cache drops cached KV (vLLM)
    shares_learner_weights: bool = False  # generates with the learner's own modules: no weight sync


class RolloutBackend(ABC):
    """A generation engine as the rollout, evaluation and benches see it."""

    name: str = "backend"
    tokenizer: Any

    @property
    @abstractmethod
    def capabilities(self) -> Capabilities: ...

    @property
    @abstractmethod
    def num_layers(self) -> int: ...

    @abstractmethod
    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[Generation]: ...

    @abstractmethod
    def generate_branches(self, requests: list[BranchRequest], sampling: SamplingConfig) -> list[list[Generation]]: ...

    def generate_then_branch(
        self,
        prompt_ids: list[list[int]],
        sampling: SamplingConfig,
        make_request: Callable[[int, Generation], BranchRequest],
        answer_sampling: SamplingConfig,
    ) -> tuple[list[Generation], list[list[Generation]]]:
        """The full rollouts, then every branch ``make_request(i, full_i)`` asks for."""
        fulls = self.generate(prompt_ids, sampling)
        requests = [make_request(i, g) for i, g in enumerate(fulls)]
        if not any(r.cuts for r in requests):
            return fulls, [[] for _ in requests]
        return fulls, self.generate_branches(requests, answer_sampling)

    @abstractmethod
    def generate_first_finish(
        self, prompt_ids: list[list[int]], sampling: SamplingConfig, finishers: int = 1
    ) -> list[list[Generation]]: ...

    @abstractmethod
    def decide_plans(self, prompt_ids: list[list[int]]) -> list[list[int]]: ...

    @abstractmethod
    def generate_routed(
        self,
        prompt_ids: list[list[int]],
        sampling: SamplingConfig,
        plans: list[list[int]],
        ignore_eos: bool = False,
        group_by_plan: bool = True,
    ) -> list[Generation]:
        """``sampling.n`` completions of each prompt under its plan, prompt-major. ``group_by_plan``:
        batch rows that share a plan together (a layer the batch skips costs nothing: serving,
        evaluation); False mixes plans in one batch (joint training's short layer variants)."""

    @abstractmethod
    def load_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> None: ...

    def sleep(self) -> None:
        """Free accelerator memory until ``wake_up`` (a no-op unless ``capabilities.sleeps``)."""
        return None

    def wake_up(self) -> None:
        """Undo ``sleep``."""
        return None

    def reset_prefix_cache(self) -> None:
        """Drop cached prefix KV (a no-op unless ``capabilities.prefix_cache``)."""
        return None

    @property
    def kv_block_size(self) -> int | None:
        """The KV block size prefix-cache hits come in (None: no paged cache)."""
        return None

    @property
    def local_model(self) -> Any | None:
        """The transformers model generating in this process, if there is one (else None)."""
        return None

    @property
    def model_config(self) -> Any | None:
        """The generating model's transformers config (None where the backend cannot tell)."""
        return None

    @property
    def router_shape(self) -> tuple[int, int] | None:
        """(router hidden width, prompt windows) of the routers a routed backend holds, else None."""
        return None

    def with_skip_bias(self, bias: float | None) -> RolloutBackend:
        """This backend's model with ``bias`` added to every router's skip logit (None: the unrouted
        model); a new view, this one unchanged. Backends that cannot route on the fly refuse."""
        raise NotImplementedError(f"the {self.name} backend cannot re-bias its routers (use the hf backend)")

    def shutdown(self) -> None:
        """Release engines and actors."""
        return None
