"""A thinking budget as a vLLM logits processor: after N thinking tokens the model is made to write
the exit prompt it was trained with (``Time is limited, stop thinking and start answering.\\n</think>\\n\\n``)
and then answers on its own; a thought that closed by itself before N gets nothing injected.

Loaded by the server with ``--logits-processors rollout.think_budget:ThinkBudgetProcessor`` (the
same on vLLM's CPU and GPU runners, unlike vLLM 0.32's built-in ``thinking_token_budget``, which on
the CPU runner ignores a natural ``</think>``). Per request, through ``vllm_xargs``::

    {"think_budget": N, "force_ids": [exit prompt token ids], "think_end_id": id of </think>,
     "think_open_id": id of <think> (optional: a completion that opens with it starts counting after it)}

The rule is a pure function of the request's output so far (``forced_token``), so preemption and
recomputation, which re-add a request with its earlier output, land in the same state.
"""

from __future__ import annotations

from collections.abc import Sequence

XARG_BUDGET = "think_budget"


def forced_token(
    out: Sequence[int], budget: int, force_ids: Sequence[int], think_end_id: int, think_open_id: int | None = None
) -> int | None:
    """The token the next step must emit, or None (sample freely).

    start = 1 if the completion opened with <think> else 0;  cut = start + budget
    free while len(out) < cut, or once </think> appeared in out[:cut] (closed on its own);
    else out[cut:] is a prefix of force_ids: emit force_ids[len(out) - cut] until all are written.
    """
    start = 1 if think_open_id is not None and len(out) > 0 and out[0] == think_open_id else 0
    cut = start + budget
    n = len(out)
    if n < cut or think_end_id in out[start:cut]:
        return None
    k = n - cut
    if k >= len(force_ids) or list(out[cut:]) != list(force_ids[:k]):
        return None
    return force_ids[k]


MAX_FORCE_IDS = 256


def _is_id(t, vocab_size: int | None) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0 and (vocab_size is None or t < vocab_size)


def check_args(xa: dict, vocab_size: int | None = None) -> str | None:
    """What is wrong with a request's budget arguments (``vllm_xargs``), or None: the budget an
    integer >= 0, the exit prompt 1..256 token ids, the tag ids token ids (below ``vocab_size`` when
    it is known: the engine checks again with it, and drops a request's budget rather than raise)."""
    if XARG_BUDGET not in xa:
        return None
    b = xa[XARG_BUDGET]
    if not isinstance(b, int) or isinstance(b, bool) or b < 0:
        return f"think_budget must be an integer >= 0, got {b!r}"
    f = xa.get("force_ids")
    if not isinstance(f, list) or not 1 <= len(f) <= MAX_FORCE_IDS or not all(_is_id(t, vocab_size) for t in f):
        return f"force_ids must be a list of 1 to {MAX_FORCE_IDS} token ids in the vocabulary"
    if not _is_id(xa.get("think_end_id"), vocab_size):
        return "think_end_id must be the token id of </think>"
    if xa.get("think_open_id") is not None and not _is_id(xa["think_open_id"], vocab_size):
        return "think_open_id must be the token id of <think>"
    return None


def _make_processor_class():
    import torch
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
    from vllm.v1.sample.logits_processor.builtin import process_dict_updates

    class ThinkBudgetProcessor(LogitsProcessor):
        """Forces the exit prompt once a request's thinking reaches its ``think_budget`` (see the module)."""

        @classmethod
        def validate_params(cls, params) -> None:
            """At admission (the API server: vLLM turns a ValueError into a 400): the arguments' types."""
            problem = check_args(params.extra_args or {})
            if problem is not None:
                raise ValueError(problem)

        def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
            self.states: dict[int, tuple] = {}
            self.vocab_size = vllm_config.model_config.get_vocab_size()

        def is_argmax_invariant(self) -> bool:
            return False  # it changes greedy output too

        def _new_state(self, params, prompt_ids, output_ids):
            xa = params.extra_args or {}
            if XARG_BUDGET not in xa or check_args(xa, self.vocab_size) is not None:
                return None  # not ours, or arguments that passed admission unchecked: never raise in the engine
            return (
                output_ids,  # vLLM's live list of the request's output ids
                xa[XARG_BUDGET],
                list(xa["force_ids"]),
                xa["think_end_id"],
                xa.get("think_open_id"),
            )

        def update_state(self, batch_update: BatchUpdate | None) -> None:
            process_dict_updates(self.states, batch_update, self._new_state)

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            for row, (out, budget, force, end_id, open_id) in self.states.items():
                tok = forced_token(out, budget, force, end_id, open_id)
                if tok is not None and 0 <= row < logits.shape[0]:
                    logits[row].fill_(float("-inf"))
                    logits[row, tok] = 0.0
            return logits

    return ThinkBudgetProcessor


def __getattr__(name: str):
    # vLLM is imported only when the server loads the class (the pure rule above stays importable without it)
    if name == "ThinkBudgetProcessor":
        cls = _make_processor_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
